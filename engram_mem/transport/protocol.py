"""The bulk data plane's wire format: fixed binary frames over one TCP connection.

    frame  = header | meta | bulk
    header = struct "<4sBBHIQ": magic b"EMdp", version, op, flags (0), meta bytes (u32), bulk bytes (u64)

A connection opens with HELLO (meta: the cluster credential, utf-8); the shard answers OK or an
ERROR frame (Unauthenticated) and closes. Then requests, one at a time per connection:

    GATHER  meta: GatherRequest (ids inside; its chunk_rows is ignored)   bulk: -
    WRITE   meta: WriteRequest with `rows` empty                          bulk: the rows
    PUSH    meta: PushRequest with `grads` empty                          bulk: the gradients
    reply   OK    meta: WriteReply / PushReply ("" for GATHER)            bulk: GATHER's rows
            ERROR meta: "<error class>\n<message>" (utf-8)                bulk: -

The meta messages are those of proto/engram_mem/v1/memory.proto, so a request means on this
plane exactly what it means over gRPC (epochs, idempotency keys, limits); only the bulk bytes
travel outside protobuf, so a shard sends rows straight from its gather buffer and a client
receives them straight into the caller's array (recv_into). An ERROR before the bulk means no
row of the reply was sent; a shard that fails mid-reply closes the connection (the client sees
an unfinished reply: ShardUnavailable, retried).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

from engram_mem.errors import ERROR_CLASSES, EngramMemError, InvalidArgument, RequestTooLarge

MAGIC = b"EMdp"
VERSION = 1
HEADER = struct.Struct("<4sBBHIQ")

HELLO, GATHER, WRITE, PUSH = 1, 2, 3, 4
OK, ERROR = 0x10, 0x11
REQUEST_OPS = {HELLO: "Hello", GATHER: "Gather", WRITE: "Write", PUSH: "Push"}

BLOCK_BYTES = 4 << 20      # a gather reply is gathered and sent in blocks of about this size
MAX_ERROR_BYTES = 64 << 10  # an ERROR frame's message is cut to this
MAX_HELLO_BYTES = 4096
THREAD_BYTES = 1 << 20  # bulk of at least this moves on a pool thread over a blocking socket (on_thread)
POLL_S = 0.5            # a blocked transfer looks this often whether it was given up
STALL_S = 60.0          # a peer that takes or gives no byte for this long is given up on


class FrameError(InvalidArgument):
    """Bytes that are not a frame of this protocol (bad magic, version, op or sizes): the
    connection's framing is lost, so the shard answers with an ERROR frame and closes it."""


def pack_header(op: int, meta_len: int, bulk_len: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, op, 0, meta_len, bulk_len)


def frame(op: int, meta: bytes = b"", bulk_len: int = 0) -> bytes:
    """Header and meta of a frame in one buffer (the bulk, if any, is sent after it as is)."""
    return pack_header(op, len(meta), bulk_len) + meta


async def recv_some(loop, sock, view) -> int:
    """recv_into on a non-blocking socket: what has arrived, at once; a wait on the loop only when
    nothing has. 0: the peer closed."""
    try:
        return sock.recv_into(view)
    except BlockingIOError:
        return await loop.sock_recv_into(sock, view)


async def send_parts(loop, sock, parts) -> None:
    """Send the buffers in order on a non-blocking socket: as far as the socket takes them at once in
    one system call (a small frame and its bulk: one sendmsg, no wait on the loop), the rest on the loop."""
    try:
        k = sock.sendmsg(parts)
    except BlockingIOError:
        k = 0
    for part in parts:
        n = memoryview(part).nbytes
        if k >= n:
            k -= n
            continue
        await loop.sock_sendall(sock, memoryview(part).cast("B")[k:] if k else part)
        k = 0


class Lost(ConnectionError):
    """A bulk transfer on a pool thread ended early: the peer closed, stalled or it was given up."""


async def on_thread(pool, sock: socket.socket, fn, *args):
    """fn(stop, *args) on a pool thread while `sock` is blocking, then the socket is non-blocking again.

    Bulk bytes move that way in a few large system calls with no event-loop round per arrival of
    bytes (the loop's receive took twice the CPU of a blocking one here). The loop leaves the socket
    alone meanwhile: a connection carries one request at a time. If the awaiting task is cancelled,
    the thread is told (stop), the socket is shut down to wake it, and the cancel waits until the
    thread has let go of the buffers; the connection must then be closed, never reused."""
    stop = threading.Event()
    fut = asyncio.get_running_loop().run_in_executor(pool, _blocking, sock, stop, fn, args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        stop.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        await asyncio.wait([fut])
        raise


_TIMEVAL = struct.Struct("@ll")  # struct timeval (tv_sec, tv_usec), as SO_RCVTIMEO / SO_SNDTIMEO take it


def _blocking(sock, stop, fn, args):
    # Truly blocking, with the kernel's own timeouts (SO_RCVTIMEO/SO_SNDTIMEO), not Python's
    # settimeout: that polls before every call and gets back only what has arrived so far, five
    # times the CPU of a MSG_WAITALL receive that sleeps in the kernel until its bytes are in.
    tv = _TIMEVAL.pack(int(POLL_S), int(POLL_S % 1 * 1e6))
    sock.setblocking(True)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    try:
        return fn(stop, *args)
    finally:
        try:
            zero = _TIMEVAL.pack(0, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, zero)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, zero)
            sock.setblocking(False)
        except OSError:
            pass


def _moving(stop: threading.Event, since: float, what: str) -> None:
    if stop.is_set():
        raise Lost(f"{what}: given up")
    if time.monotonic() - since > STALL_S:
        raise Lost(f"{what}: no byte moved in {STALL_S:.0f} s")


def recv_blocking(stop: threading.Event, sock: socket.socket, view: memoryview) -> None:
    """On on_thread's thread: exactly len(view) bytes into view."""
    got, n, since = 0, len(view), time.monotonic()
    while got < n:
        try:
            k = sock.recv_into(view[got:], 0, socket.MSG_WAITALL)
        except BlockingIOError:  # SO_RCVTIMEO passed with no byte
            k = -1
        if k == 0:
            raise Lost(f"connection closed after {got} of {n} bytes")
        if k > 0:
            got, since = got + k, time.monotonic()
        if got < n:
            _moving(stop, since, f"receive stopped after {got} of {n} bytes")


def send_blocking(stop: threading.Event, sock: socket.socket, view: memoryview) -> None:
    """On on_thread's thread: all of view."""
    sent, n, since = 0, len(view), time.monotonic()
    while sent < n:
        try:
            k = sock.send(view[sent:])
        except BlockingIOError:  # SO_SNDTIMEO passed with no byte taken
            k = 0
        if k:
            sent, since = sent + k, time.monotonic()
        if sent < n:
            _moving(stop, since, f"send stopped after {sent} of {n} bytes")


def parse_header(raw: bytes | bytearray | memoryview, max_meta: int, max_bulk: int,
                 ops=REQUEST_OPS) -> tuple[int, int, int]:
    """(op, meta bytes, bulk bytes) of a header, or FrameError / RequestTooLarge naming what is wrong."""
    magic, version, op, flags, meta_len, bulk_len = HEADER.unpack(raw)
    if magic != MAGIC:
        raise FrameError(f"data plane: not a frame of this protocol (magic {bytes(magic)!r}, expected {MAGIC!r}); "
                         f"this port speaks engram-mem's bulk protocol (engram_mem/transport/protocol.py), "
                         f"gRPC is on the shard's main port")
    if version != VERSION:
        raise FrameError(f"data plane: protocol version {version} is not supported (this shard speaks {VERSION})")
    if op not in ops:
        raise FrameError(f"data plane: unknown op {op} (expected one of {sorted(ops)})")
    if flags:
        raise FrameError(f"data plane: flags {flags:#x} are not defined (send 0)")
    if meta_len > max_meta:
        raise RequestTooLarge(f"data plane: a {ops[op] if isinstance(ops, dict) else op} frame's meta is "
                              f"{meta_len} bytes, over the {max_meta}-byte limit; split the batch")
    if bulk_len > max_bulk:
        raise RequestTooLarge(f"data plane: a {ops[op] if isinstance(ops, dict) else op} frame's bulk is "
                              f"{bulk_len} bytes, over the {max_bulk}-byte limit; split the batch")
    return op, meta_len, bulk_len


def encode_error(e: BaseException) -> bytes:
    """"<class>\n<message>": the error's class, or the nearest of its bases the other side knows."""
    cls = next((c.__name__ for c in type(e).__mro__ if c.__name__ in ERROR_CLASSES), "EngramMemError") \
        if isinstance(e, EngramMemError) else "EngramMemError"
    return f"{cls}\n{e}".encode("utf-8", "replace")[:MAX_ERROR_BYTES]


def decode_error(meta: bytes, address: str) -> EngramMemError:
    """The exception an ERROR frame names, as the shard raised it."""
    text = bytes(meta).decode("utf-8", "replace")
    cls_name, _, message = text.partition("\n")
    cls = ERROR_CLASSES.get(cls_name)
    if cls is None:
        return EngramMemError(f"shard {address}: {text}")
    return cls(message)
