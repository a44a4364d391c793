"""The shard's bulk data plane: Gather, Write and Push over framed TCP (transport/protocol.py).

    data = DataServer(servicer, lambda: server.security, host="127.0.0.2")
    port = await data.start()        # on the shard's event loop, beside the gRPC server
    ...
    await data.stop()

It serves the same requests as the gRPC servicer, through the same servicer methods (one
meaning, two transports): rows of a Gather are gathered into a per-connection block of about
protocol.BLOCK_BYTES and sent from it (one copy in user space: the gather itself, on a gather
thread while a send thread sends the block before; a reply under INLINE_REPLY_BYTES, as decode's
are, is gathered on the loop and sent with its header in one system call); the rows of a
Write and the gradients of a Push are received into one buffer of exactly their size, which the
store reads in place.

What guards the gRPC port guards this one: a connection is refused until its HELLO presents a
credential (compared in constant time, Security.level); a read-only credential may Gather only,
and the level is checked again on every request, so a rotation's finish cuts old connections
off; sizes are checked before anything is allocated (meta <= 2 x max_request_bytes, bulk <=
max_request_bytes; Gather replies within wire.max_reply_bytes); any bytes at all get an ERROR
frame naming what was wrong, or, where the framing is lost, that frame and a closed connection,
and the server goes on serving. Memory per connection: one request and one reply block. At
most MAX_CONNECTIONS connections; more are told so and closed. TLS: this plane does not speak
it; a shard whose cluster uses TLS does not open it, and clients use gRPC (over TLS) instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import time

import numpy as np

from engram_mem.errors import EngramMemError, PermissionDenied, ResourceExhausted, Unauthenticated
from engram_mem.transport import protocol as P
from engram_mem.wire import decode_request

log = logging.getLogger("engram_mem.shard.data_server")

MAX_CONNECTIONS = 512
HELLO_TIMEOUT_S = 10.0
GATHER_THREADS = 2  # threads gathering reply blocks (numpy lets go of the GIL)
SEND_THREADS = 32   # large replies sent at once, each from a thread over its blocking socket
# Gather replies under this size are gathered on the loop and sent in one sendmsg (the client, too,
# receives them on its loop); from it on, both sides move the rows on threads.
INLINE_REPLY_BYTES = P.THREAD_BYTES


class _Closed(Exception):
    """The peer closed the connection (between frames: normal; inside one: a broken request)."""


class DataServer:
    def __init__(self, servicer, security, host: str, port: int = 0):
        self.servicer, self._security, self.host, self.port = servicer, security, host, port
        self.store = servicer.store
        self.max_meta = 2 * self.store.max_request_bytes + (64 << 10)
        self.max_bulk = self.store.max_request_bytes
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._conns: set[asyncio.Task] = set()
        self._gatherers = concurrent.futures.ThreadPoolExecutor(GATHER_THREADS, thread_name_prefix="engram-gather")
        self._senders = concurrent.futures.ThreadPoolExecutor(SEND_THREADS, thread_name_prefix="engram-send")
        self.connections_refused = 0

    async def start(self) -> int:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(128)
        s.setblocking(False)
        self._sock, self.port = s, s.getsockname()[1]
        self._accepting = asyncio.ensure_future(self._accept())
        return self.port

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, *([self._accepting] if self._accepting else []), return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        self._gatherers.shutdown(wait=False)
        self._senders.shutdown(wait=False)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                raise
            except OSError as e:  # EMFILE and the like: wait, keep accepting
                log.warning("shard %d data plane: accept failed: %s", self.store.shard_id, e)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.ensure_future(self._serve(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    # ---- one connection ------------------------------------------------------------------
    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        c = _Conn(loop, conn)
        try:
            if len(self._conns) > MAX_CONNECTIONS:
                self.connections_refused += 1
                await c.send_error(ResourceExhausted(
                    f"shard {self.store.shard_id}: data plane has {MAX_CONNECTIONS} connections open; retry later"))
                return
            credential = await asyncio.wait_for(self._hello(c), HELLO_TIMEOUT_S)
            if credential is None:
                return
            while True:
                try:
                    hdr = await c.recv_exact(P.HEADER.size, between_frames=True)
                except _Closed:
                    return
                if not await self._request(c, hdr, credential):
                    return
        except (_Closed, ConnectionError, OSError, asyncio.TimeoutError):
            pass  # the peer went away (or never said hello): nothing to answer
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug must not stop the server
            log.exception("shard %d data plane: connection failed", self.store.shard_id)
        finally:
            conn.close()

    async def _hello(self, c: "_Conn") -> str | None:
        m = self.servicer.metrics
        hdr = await c.recv_exact(P.HEADER.size)
        try:
            op, meta_len, bulk_len = P.parse_header(hdr, P.MAX_HELLO_BYTES, 0)
            if op != P.HELLO:
                raise Unauthenticated(f"shard {self.store.shard_id}: the data plane needs HELLO with the cluster "
                                      f"credential first; got {P.REQUEST_OPS[op]}")
        except EngramMemError as e:
            m.request("Hello")
            m.error("Hello", e.code, type(e).__name__)
            await c.send_error(e)
            return None
        presented = bytes(await c.recv_exact(meta_len)).decode("utf-8", "replace")
        m.request("Hello")
        if not self._security().level(presented):
            err = Unauthenticated(f"shard {self.store.shard_id}: data plane: the credential presented is not "
                                  f"this cluster's")
            m.error("Hello", err.code, type(err).__name__)
            await c.send_error(err)
            return None
        await c.send(P.frame(P.OK))
        return presented

    async def _request(self, c: "_Conn", hdr, credential: str) -> bool:
        """Serve one request; False when the connection must close (framing lost)."""
        m, sv = self.servicer.metrics, self.servicer
        try:
            op, meta_len, bulk_len = P.parse_header(hdr, self.max_meta, self.max_bulk)
        except EngramMemError as e:
            m.request("Frame")
            m.error("Frame", e.code, type(e).__name__)
            await c.send_error(e)
            return False
        name = P.REQUEST_OPS[op]
        meta = await c.recv_exact(meta_len)
        bulk = await c.recv_exact(bulk_len) if bulk_len else b""
        t0 = time.perf_counter()
        m.request(name)
        sending = c.started = False
        try:
            level = self._security().level(credential)  # again: a finished rotation cuts old credentials off
            if not level:
                raise Unauthenticated(f"shard {self.store.shard_id}: {name}: this connection's credential is no "
                                      f"longer accepted (rotated); reconnect with the current one")
            if op == P.HELLO:
                raise P.FrameError(f"shard {self.store.shard_id}: data plane: HELLO twice on one connection")
            if level != "full" and op != P.GATHER:
                raise PermissionDenied(f"shard {self.store.shard_id}: {name} needs the full cluster credential; "
                                       f"this one is read-only (it allows Gather, Describe, Stats, Health)")
            request = decode_request(name, bytes(meta))
            if op == P.GATHER:
                if bulk_len:
                    raise P.FrameError(f"shard {self.store.shard_id}: data plane: a Gather frame carries no bulk "
                                       f"bytes (got {bulk_len})")
                plan = sv.gather_plan(request)
                sending = True
                await self._send_rows(c, plan)
            else:
                if op == P.WRITE:
                    n = await sv.write(request, bulk)
                    reply = sv.write_reply(n)
                else:
                    n = await sv.push(request, bulk)
                    reply = sv.push_reply(n)
                await c.send(P.frame(P.OK, reply.SerializeToString()))
            return True
        except EngramMemError as e:
            if sending and c.started:
                raise  # mid-reply: the framing cannot carry an error any more; close
            m.error(name, e.code, type(e).__name__)
            await c.send_error(e)
            return not isinstance(e, P.FrameError)
        except (_Closed, ConnectionError, OSError):
            raise
        except Exception as e:  # noqa: BLE001 - a bug, not bad input: logged, answered, serving goes on
            log.exception("shard %d data plane: %s failed", self.store.shard_id, name)
            if sending and c.started:
                raise
            err = EngramMemError(f"shard {self.store.shard_id}: internal error in {name}: {type(e).__name__}: {e}")
            m.error(name, "INTERNAL", "EngramMemError")
            await c.send_error(err)
            return True
        finally:
            m.observe(name, time.perf_counter() - t0)

    async def _send_rows(self, c: "_Conn", plan) -> None:
        """The reply of a Gather: blocks gathered on a gather thread while a send thread sends the
        block before over the blocking socket (protocol.on_thread: no event-loop round per block's
        worth of socket space), two blocks per connection. A block is gathered under the table's
        lock, so a row is never read while a push or write changes it."""
        ts, local = plan
        row_bytes = ts.spec.row_bytes
        header = P.frame(P.OK, b"", local.size * row_bytes)
        rows = ts.rows  # one buffer for the whole reply, even if the table grows meanwhile
        if local.size * row_bytes < INLINE_REPLY_BYTES and not self.store.budgets:
            # A small reply (decode's): gathered here on the loop and sent with its header at once;
            # a thread hand-off and a second send would cost more than the gather itself.
            parts = [header]
            if local.size:
                block = c.blocks(local.size, ts.spec.storage_dim, ts.spec.storage_dtype)[0]
                with ts.lock:
                    parts.append(memoryview(self.servicer.gather_block(ts, rows, local, out=block)).cast("B"))
            c.started = True
            await c.send(*parts)
            return
        await c.send(header)
        c.started = True
        if not local.size:
            return
        step = max(1, P.BLOCK_BYTES // row_bytes)
        blocks = c.blocks(min(step, local.size), ts.spec.storage_dim, ts.spec.storage_dtype)

        def gather(i: int, s: int) -> np.ndarray:
            with ts.lock:
                return self.servicer.gather_block(ts, rows, local[s:s + step], out=blocks[i % 2])

        def send_all(stop) -> None:
            starts = range(0, local.size, step)
            pending = self._gatherers.submit(gather, 0, 0)
            try:
                for i in range(len(starts)):
                    part = pending.result()
                    pending = self._gatherers.submit(gather, i + 1, starts[i + 1]) if i + 1 < len(starts) else None
                    P.send_blocking(stop, c.sock, memoryview(part).cast("B"))
            finally:
                if pending is not None:  # the send failed: let the gather end before its block is freed
                    concurrent.futures.wait([pending])

        await P.on_thread(self._senders, c.sock, send_all)


class _Conn:
    """One accepted socket: exact reads into fresh or given buffers, sends, and its reply block."""

    def __init__(self, loop, sock: socket.socket):
        self.loop, self.sock = loop, sock
        self.started = False
        self._blocks: list[np.ndarray] = []

    async def recv_exact(self, n: int, between_frames: bool = False) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = await P.recv_some(self.loop, self.sock, view[got:])
            if k == 0:
                if between_frames and got == 0:
                    raise _Closed()
                raise _Closed(f"peer closed after {got} of {n} bytes")
            got += k
        return buf

    async def send(self, *parts) -> None:
        await P.send_parts(self.loop, self.sock, parts)

    async def send_error(self, e: BaseException) -> None:
        try:
            await self.send(P.frame(P.ERROR, P.encode_error(e)))
        except OSError:
            pass

    def blocks(self, rows: int, dim: int, dtype) -> list[np.ndarray]:
        """This connection's two reply blocks, reused while big enough and of the table's row type."""
        b = self._blocks
        if not b or b[0].dtype != np.dtype(dtype) or b[0].shape[1] != dim or b[0].shape[0] < rows:
            b = self._blocks = [np.empty((rows, dim), dtype=dtype) for _ in range(2)]
        return b
