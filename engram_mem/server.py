"""The gRPC face of a shard: a thin grpc.aio servicer over a ShardStore, on uvloop.

    server = ShardServer(store, host="127.0.0.2")
    address = server.start()          # "127.0.0.2:PORT"; serves from a background thread
    ...
    server.stop(grace=2.0)

Protobuf in, plain calls on ShardStore, protobuf out. Errors are mapped to gRPC status codes in
one place (`_rpc`): the status message is the error's sentence and the trailing metadata
`engram-error` names its class, so the client re-raises the same exception. A bad request never
stops the server.

Gather is the hot path. Its reply streams as `RowsChunk` messages of about 1 MB, encoded here by
hand (field tag + length + raw rows: one copy after the gather, none through protobuf objects),
which is byte-for-byte the `RowsChunk` of proto/engram_mem/v1/memory.proto, so any gRPC client
can read it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import json
import logging
import os
import threading
import time

import grpc
import numpy as np

from engram_mem.errors import EngramMemError
from engram_mem.pb.v1 import memory_pb2 as pb
from engram_mem.shard import ShardStore
from engram_mem.wire import SERVICE, chunk_rows_for, encode_rows_chunk

log = logging.getLogger("engram_mem.server")


class _Window:
    """Counts over the last `seconds` seconds, in one-second buckets."""

    def __init__(self, seconds: int = 10):
        self.seconds = seconds
        self.buckets: collections.deque = collections.deque()

    def add(self, requests: int = 0, nbytes: int = 0) -> None:
        now = int(time.monotonic())
        if not self.buckets or self.buckets[-1][0] != now:
            self.buckets.append([now, 0, 0])
        self.buckets[-1][1] += requests
        self.buckets[-1][2] += nbytes

    def rates(self) -> tuple[float, float]:
        now = int(time.monotonic())
        while self.buckets and self.buckets[0][0] <= now - self.seconds:
            self.buckets.popleft()
        req = sum(b[1] for b in self.buckets)
        nbytes = sum(b[2] for b in self.buckets)
        return req / self.seconds, nbytes / self.seconds


class ShardStats:
    def __init__(self):
        self.started = time.time()
        self.requests: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.rows_gathered = self.bytes_sent = self.rows_pushed = self.rows_written = 0
        self.window = _Window()


def _rpc(method):
    """Count the call and map engram-mem errors to gRPC statuses (one place for all handlers)."""
    name = method.__name__

    async def abort(self, context, e: Exception):
        if isinstance(e, EngramMemError):
            code, cls = getattr(grpc.StatusCode, e.code), type(e).__name__
        else:  # a bug, not bad input: log it, keep serving
            log.exception("shard %s: %s failed", self.store.shard_id, name)
            code, cls = grpc.StatusCode.INTERNAL, "EngramMemError"
            e = EngramMemError(f"shard {self.store.shard_id}: internal error in {name}: {type(e).__name__}: {e}")
        self.stats.errors[cls] += 1
        context.set_trailing_metadata((("engram-error", cls),))
        await context.abort(code, str(e))

    if name == "Gather":  # a server-streaming handler is an async generator
        @functools.wraps(method)
        async def stream(self, request, context):
            self.stats.requests[name] += 1
            self.stats.window.add(requests=1)
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as e:  # noqa: BLE001 - every error becomes a status
                await abort(self, context, e)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        self.stats.requests[name] += 1
        self.stats.window.add(requests=1)
        try:
            out = method(self, request, context)
            return (await out) if inspect.isawaitable(out) else out
        except Exception as e:  # noqa: BLE001
            await abort(self, context, e)
    return unary


class ShardServicer:
    def __init__(self, store: ShardStore, node_ip: str = "", node_id: str = ""):
        self.store, self.node_ip, self.node_id = store, node_ip, node_id
        self.stats = ShardStats()

    @_rpc
    async def Gather(self, request: pb.GatherRequest, context):
        store = self.store
        store.check_ready(request.epoch)
        ts, ids = store.parse_ids(request.table, request.ids)
        local = store._local_rows(ts, ids)
        step = request.chunk_rows or chunk_rows_for(ts.spec.row_bytes)
        rows = ts.rows  # one buffer for the whole reply, even if the table grows meanwhile
        for start in range(0, max(local.size, 1), step):
            chunk = np.take(rows, local[start:start + step], axis=0)
            msg = encode_rows_chunk(chunk)
            self.stats.rows_gathered += chunk.shape[0]
            self.stats.bytes_sent += chunk.nbytes
            self.stats.window.add(nbytes=chunk.nbytes)
            yield msg

    # Write and Push are applied at once and acknowledged only when their log record is written
    # (the log's group commit: every request that arrives meanwhile shares the next write).
    @_rpc
    async def Write(self, request: pb.WriteRequest, context):
        n, lsn = self.store.write(request.table, request.ids, request.rows, dtype=request.dtype or None,
                                  epoch=request.epoch, client=request.client, seq=request.seq)
        if self.store.log is not None:
            await self.store.log.wait(lsn)
        self.stats.rows_written += n
        return pb.WriteReply(rows_written=n)

    @_rpc
    async def Push(self, request: pb.PushRequest, context):
        step = request.step
        lr = step.lr if step.HasField("lr") else None
        n, lsn = self.store.push(request.table, request.ids, request.grads, dtype=request.dtype or "float32",
                                 lr=lr, step=step.step, epoch=request.epoch, client=request.client,
                                 seq=request.seq)
        if self.store.log is not None:
            await self.store.log.wait(lsn)
        self.stats.rows_pushed += n
        return pb.PushReply(rows_updated=n)

    @_rpc
    def Describe(self, request, context):
        d = self.store.describe()
        tables = []
        for name, t in d["tables"].items():
            s = t["spec"]
            tables.append(pb.TableInfo(
                name=name, rows=s["rows"], dim=s["dim"], dtype=s["dtype"], seed=s["seed"],
                init_std=s["init_std"], num_slots=s["num_slots"], slot_rows=(s["rows"] + s["num_slots"] - 1) // s["num_slots"],
                owned_slots=np.asarray(t["owned_slots"], dtype="<i4").tobytes(),
                optimizer=json.dumps(t["optimizer"]), shm_path=t["shm_path"], resident_rows=t["resident_rows"],
                frame_of=np.asarray(t["frame_of"], dtype="<i4").tobytes(), frames=t["frames"]))
        return pb.DescribeReply(shard_id=d["shard_id"], epoch=d["epoch"], node_ip=self.node_ip,
                                node_id=self.node_id, tables=tables, layout_path=d["layout_path"],
                                layout_version=d["layout_version"])

    @_rpc
    def Stats(self, request, context):
        st = self.stats
        rps, bps = st.window.rates()
        return pb.StatsReply(
            shard_id=self.store.shard_id, uptime_s=time.time() - st.started,
            requests=dict(st.requests), errors=dict(st.errors), rows_gathered=st.rows_gathered,
            bytes_sent=st.bytes_sent, rows_pushed=st.rows_pushed, rows_written=st.rows_written,
            requests_per_s=rps, gather_gbps=bps / 1e9, table_bytes=self.store.table_bytes(),
            rss_bytes=_rss_bytes(), optimizer_state_bytes=self.store.state_bytes())

    @_rpc
    def Health(self, request, context):
        store = self.store
        status = pb.HealthReply.SERVING if store.ready else pb.HealthReply.NOT_READY
        return pb.HealthReply(status=status, message=store.not_ready_reason, epoch=store.epoch)


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _handlers(servicer: ShardServicer) -> grpc.GenericRpcHandler:
    ident = lambda b: b  # noqa: E731 - Gather replies are pre-encoded RowsChunk bytes
    unary = {
        "Write": pb.WriteRequest, "Push": pb.PushRequest, "Describe": pb.DescribeRequest,
        "Stats": pb.StatsRequest, "Health": pb.HealthRequest,
    }
    table = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=req.FromString,
            response_serializer=lambda m: m.SerializeToString())
        for name, req in unary.items()
    }
    table["Gather"] = grpc.unary_stream_rpc_method_handler(
        servicer.Gather, request_deserializer=pb.GatherRequest.FromString, response_serializer=ident)
    return grpc.method_handlers_generic_handler(SERVICE, table)


def server_options(max_request_bytes: int) -> list[tuple[str, int]]:
    # The transport accepts twice the application limit, so that the servicer (not gRPC) rejects
    # an oversized request with a message that names the table and field.
    limit = 2 * max_request_bytes + (1 << 20)
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0)]


class ShardServer:
    """Runs the servicer on a uvloop event loop in a daemon thread."""

    def __init__(self, store: ShardStore, host: str = "127.0.0.1", port: int = 0, node_id: str = ""):
        self.store, self.host, self.port = store, host, port
        self.servicer = ShardServicer(store, node_ip=host, node_id=node_id)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._grace = 2.0
        self.address = ""

    def start(self, timeout: float = 30.0) -> str:
        import uvloop

        started = threading.Event()
        error: list[BaseException] = []

        async def serve():
            self._stopping = asyncio.Event()
            self._server = grpc.aio.server(options=server_options(self.store.max_request_bytes))
            self._server.add_generic_rpc_handlers([_handlers(self.servicer)])
            self.port = self._server.add_insecure_port(f"{self.host}:{self.port}")
            await self._server.start()
            self.address = f"{self.host}:{self.port}"
            started.set()
            await self._stopping.wait()
            await self._server.stop(self._grace)  # in-flight requests get `grace` seconds to finish

        def run():
            self._loop = uvloop.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(serve())
            except BaseException as e:  # noqa: BLE001 - reported to start()
                error.append(e)
                started.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name=f"engram-shard-{self.store.shard_id}-grpc", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise RuntimeError(f"shard {self.store.shard_id}: gRPC server did not start within {timeout}s")
        if error:
            raise RuntimeError(f"shard {self.store.shard_id}: gRPC server failed to start: {error[0]}") from error[0]
        return self.address

    def stop(self, grace: float = 2.0) -> None:
        if self._loop is None or self._loop.is_closed() or self._thread is None:
            return
        self._grace = grace
        try:
            self._loop.call_soon_threadsafe(self._stopping.set)
        except RuntimeError:  # the loop already closed
            pass
        self._thread.join(timeout=grace + 10)
