"""TcpConnector: bulk rows over the shards' framed-TCP data plane (transport/protocol.py).

Per member a small pool of connections, each authenticated once (HELLO with the client's
credential) and carrying one request at a time; a request in flight holds its own connection,
so parts of one request and concurrent requests never queue behind each other. All I/O runs on
the client's event loop with non-blocking sockets (uvloop's sock_recv_into / sock_sendall).

Copies: a gather whose part maps to contiguous rows of the caller's array (one shard, ids in
request order: client/routing.repeat_plan) is received straight into that array: zero copies on
the client. Otherwise each block of rows is received into the connection's staging buffer and
scattered into place: one copy. A reply of a megabyte or more is received on a pool thread over
the blocking socket (protocol.on_thread), smaller ones on the loop.
Write rows and Push gradients are sent from the caller's (contiguous) array as they are.

Failures: a member that cannot be connected to is ShardUnavailable(sent=False) (nothing left);
a connection lost after a request started to go out is ShardUnavailable(sent=True); an ERROR
frame is the shard's own error class. A connection that met any of these, or whose request was
cancelled mid-way, is closed, never returned to the pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket

import numpy as np

from engram_mem.errors import EngramMemError, ShardUnavailable
from engram_mem.pb.v1 import memory_pb2 as pb
from engram_mem.transport import protocol as P
from engram_mem.transport.connector import RowConnector, all_or_none
from engram_mem.transport.grpc_connector import push_request
from engram_mem.wire import ids_bytes

IDLE_PER_MEMBER = 8   # connections kept open per member between requests
CONNECT_TIMEOUT_S = 10.0
RECV_THREADS = 32     # bulk receives at once on pool threads (protocol.on_thread): one per connection in use
STREAMS = 4           # connections one large gather part of one member uses at once
STREAM_BYTES = 8 << 20  # ... each carrying at least this much (a part under 2x this uses one)


class _Lost(Exception):
    pass


class _Connection:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.staging: np.ndarray | None = None

    async def recv_into(self, view: memoryview) -> None:
        loop = asyncio.get_running_loop()
        got, n = 0, len(view)
        while got < n:
            k = await P.recv_some(loop, self.sock, view[got:])
            if k == 0:
                raise _Lost(f"connection closed after {got} of {n} bytes")
            got += k

    async def recv_bulk(self, pool, view: memoryview) -> None:
        """Bulk bytes: on a pool thread where there are many (protocol.THREAD_BYTES), else on the loop."""
        if len(view) >= P.THREAD_BYTES:
            await P.on_thread(pool, self.sock, P.recv_blocking, self.sock, view)
        else:
            await self.recv_into(view)

    def recv_scattered(self, stop, out: np.ndarray, dest: np.ndarray, step: int) -> None:
        """On a pool thread: the rows for out[dest], a staging block at a time (numpy's scatter runs
        without the GIL)."""
        for s in range(0, dest.size, step):
            k = min(step, dest.size - s)
            P.recv_blocking(stop, self.sock, memoryview(self.staging[:k]).cast("B"))
            out[dest[s:s + k]] = self.staging[:k]

    async def recv_bytes(self, n: int) -> bytearray:
        buf = bytearray(n)
        await self.recv_into(memoryview(buf))
        return buf

    async def send(self, *parts) -> None:
        await P.send_parts(asyncio.get_running_loop(), self.sock, parts)

    async def reply(self, address: str, max_meta: int, max_bulk: int) -> tuple[bytearray, int]:
        """(meta, bulk bytes to read) of an OK reply; an ERROR reply raises the shard's error."""
        op, meta_len, bulk_len = P.parse_header(await self.recv_bytes(P.HEADER.size), max_meta, max_bulk,
                                                ops={P.OK: "OK", P.ERROR: "ERROR"})
        meta = await self.recv_bytes(meta_len)
        if op == P.ERROR:
            raise P.decode_error(meta, address)
        return meta, bulk_len

    def close(self) -> None:
        self.sock.close()


class TcpConnector(RowConnector):
    name = "tcp"

    def __init__(self, credential: str, max_request_bytes: int):
        super().__init__(max_request_bytes)
        self.credential = credential
        self._idle: dict[str, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(RECV_THREADS, thread_name_prefix="engram-recv")
        self._busy: dict[str, int] = {}  # member address -> requests in flight (loop thread only)
        self.connects = 0

    # ---- connections ---------------------------------------------------------------------
    async def _connect(self, member: dict) -> _Connection:
        address, data = member["address"], member["data_address"]
        host, _, port = data.rpartition(":")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = _Connection(sock)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, int(port))), CONNECT_TIMEOUT_S)
            await c.send(P.frame(P.HELLO, self.credential.encode()))
            await c.reply(address, P.MAX_ERROR_BYTES, 0)
        except EngramMemError:  # refused (Unauthenticated, too many connections): the shard's answer
            c.close()
            raise
        except (OSError, asyncio.TimeoutError, _Lost) as e:
            c.close()
            raise ShardUnavailable(f"shard {address}: data plane {data} unreachable: {type(e).__name__}: {e}",
                                   address=address, sent=False) from None
        except BaseException:
            c.close()
            raise
        self.connects += 1
        self._open.add(c)
        return c

    async def _acquire(self, member: dict) -> _Connection:
        idle = self._idle.get(member["address"])
        return idle.pop() if idle else await self._connect(member)

    def _release(self, member: dict, c: _Connection) -> None:
        idle = self._idle.setdefault(member["address"], [])
        if len(idle) < IDLE_PER_MEMBER and c.sock.fileno() >= 0:
            idle.append(c)
        else:
            self._drop(c)

    def _drop(self, c: _Connection) -> None:
        self._open.discard(c)
        c.close()

    async def _call(self, member: dict, op: int, meta: bytes, bulk=None, receive=None):
        """One request on a pooled connection: (reply meta, what `receive(conn, bulk_len)` returned)."""
        address = member["address"]
        self.counts[P.REQUEST_OPS[op].lower()] += 1
        self._busy[address] = self._busy.get(address, 0) + 1
        try:
            return await self._call_on(member, op, meta, bulk, receive)
        finally:
            self._busy[address] -= 1

    async def _call_on(self, member: dict, op: int, meta: bytes, bulk, receive):
        address = member["address"]
        c = await self._acquire(member)
        ok = False
        try:
            head = P.frame(op, meta, 0 if bulk is None else bulk.nbytes)
            await (c.send(head, bulk) if bulk is not None and bulk.nbytes else c.send(head))
            rmeta, bulk_len = await c.reply(address, P.MAX_ERROR_BYTES, self.max_reply_bytes())
            got = await receive(c, bulk_len) if receive is not None else None
            ok = True
            return rmeta, got
        except (OSError, _Lost) as e:
            raise ShardUnavailable(f"shard {address}: data plane connection lost mid-request: "
                                   f"{type(e).__name__}: {e}", address=address, sent=True) from None
        finally:
            if ok:
                self._release(member, c)
            else:  # an error reply, a lost connection or a cancel mid-frame: never reused
                self._drop(c)

    def max_reply_bytes(self) -> int:
        from engram_mem.wire import max_reply_bytes

        return max_reply_bytes(self.max_request_bytes)

    # ---- requests ------------------------------------------------------------------------
    async def gather(self, member, epoch, table, ids, out, start, dest):
        """Rows of a large part come over up to STREAMS connections at once (as NCCL's socket
        transport opens several sockets per peer) when nothing else is in flight to the member:
        each stream's rows land in their own range of the output, and the shard gathers and sends
        the streams on threads of their own."""
        dim, dtype = out.shape[1], out.dtype
        row_bytes = dim * dtype.itemsize
        address = member["address"]

        async def one(first: int, end: int) -> None:
            n = end - first

            async def receive(c: _Connection, bulk_len: int):
                if bulk_len != n * row_bytes:
                    raise _Lost(f"shard {address} announced {bulk_len} bytes of rows for {n} ids x {row_bytes}")
                if dest is None:  # straight into the caller's array
                    await c.recv_bulk(self._pool, memoryview(out[start + first:start + first + n]).cast("B"))
                    self.counts["direct_bytes"] += bulk_len
                    return
                step = max(1, P.BLOCK_BYTES // row_bytes)
                if c.staging is None or c.staging.dtype != dtype or c.staging.shape[1] != dim:
                    c.staging = np.empty((step, dim), dtype=dtype)
                if bulk_len >= P.THREAD_BYTES:
                    await P.on_thread(self._pool, c.sock, c.recv_scattered, out, dest[first:first + n], step)
                else:
                    for s in range(0, n, step):
                        k = min(step, n - s)
                        await c.recv_into(memoryview(c.staging[:k]).cast("B"))
                        out[dest[first + s:first + s + k]] = c.staging[:k]
                self.counts["staged_bytes"] += bulk_len

            meta = pb.GatherRequest(table=table, ids=ids_bytes(ids[first:end]), epoch=epoch).SerializeToString()
            await self._call(member, P.GATHER, meta, receive=receive)

        # Streams only where nothing else is in flight to the member: concurrent callers (several
        # threads, several layers' fetches) already keep its connections busy.
        k = STREAMS if not self._busy.get(address) else 1
        ranges = list(self.stream_ranges(ids.size, row_bytes, k))
        if len(ranges) == 1:
            await one(*ranges[0])
            return
        streams = asyncio.Semaphore(k)

        async def limited(first: int, end: int) -> None:
            async with streams:
                await one(first, end)

        await all_or_none([limited(a, b) for a, b in ranges])

    def stream_ranges(self, n: int, row_bytes: int, streams: int = STREAMS):
        """(first, stop) ranges of a gather's ids: within the request and reply limits, and a part
        of at least 2 x STREAM_BYTES cut into up to `streams` equal ranges of at least STREAM_BYTES."""
        for first, end in self.gather_batches(n, row_bytes):
            k = max(1, min(streams, (end - first) * row_bytes // STREAM_BYTES))
            size = -(-(end - first) // k)
            for a in range(first, end, size):
                yield a, min(end, a + size)

    async def write(self, member, epoch, table, ids, rows, dtype, key):
        meta = pb.WriteRequest(table=table, ids=ids_bytes(ids), dtype=dtype, epoch=epoch, client=key[0],
                               seq=key[1]).SerializeToString()
        rmeta, _ = await self._call(member, P.WRITE, meta, bulk=_bytes_view(rows))
        return pb.WriteReply.FromString(bytes(rmeta)).rows_written

    async def push(self, member, epoch, table, ids, grads, dtype, lr, step, worker, key):
        meta = push_request(table, ids, b"", dtype, epoch, lr, step, worker, key).SerializeToString()
        rmeta, _ = await self._call(member, P.PUSH, meta, bulk=_bytes_view(grads))
        return pb.PushReply.FromString(bytes(rmeta)).rows_updated

    def forget(self, address: str) -> None:
        for c in self._idle.pop(address, []):
            self._drop(c)

    async def aclose(self) -> None:
        for c in list(self._open):
            self._drop(c)
        self._idle.clear()
        self._pool.shutdown(wait=False)


def _bytes_view(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a)).cast("B")
