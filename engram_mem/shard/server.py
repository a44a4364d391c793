"""The gRPC face of a shard: a thin grpc.aio servicer over a ShardStore, on uvloop.

    server = ShardServer(store, host="127.0.0.2", security=Security.create())
    address = server.start()          # "127.0.0.2:PORT"; serves from a background thread
    server.metrics_address            # "127.0.0.2:PORT" of its Prometheus endpoint (metrics.py)
    server.data_address               # "127.0.0.2:PORT" of its bulk data plane (data_server.py), or ""
    ...
    server.stop(grace=2.0)

Every call passes the credential check of auth.AuthInterceptor first (UNAUTHENTICATED /
PERMISSION_DENIED); TLS when the Security holds certificates. Handlers get raw bytes and parse
them in `_rpc`, so any bytes get a defined status: undecodable ones are InvalidArgument. Errors
are mapped to gRPC status codes in that one place: the status message is the error's sentence and
the trailing metadata `engram-error` names its class, so the client re-raises the same exception.
Every call is counted and timed (metrics.py). A bad request never stops the server.

Gather is the hot path. Its reply streams as `RowsChunk` messages of about 1 MB (at most
wire.MAX_CHUNK_BYTES whatever `chunk_rows` asks), encoded here by hand (field tag + length + raw
rows: one copy after the gather, none through protobuf objects), which is byte-for-byte the
`RowsChunk` of proto/engram_mem/v1/memory.proto, so any gRPC client can read it. A Gather whose
reply would exceed wire.max_reply_bytes is refused (RequestTooLarge) before any row is copied.

Bulk rows also travel on the shard's data plane (data_server.py: framed TCP beside this port,
served on the same event loop through the same servicer methods, gather_plan/gather_block,
write and push), which clients use by default; gRPC keeps control, admin and small calls and is
the fallback (TLS clusters, config data_plane="grpc").
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import threading
import time

import grpc
import numpy as np
import psutil

from engram_mem.security import AuthInterceptor, Security, same_host
from engram_mem.errors import EngramMemError, RequestTooLarge
from engram_mem.shard.metrics import ShardMetrics
from engram_mem.pb.v1 import memory_pb2 as pb
from engram_mem.storage.store import ShardStore
from engram_mem.wire import SERVICE, decode_request, encode_rows_chunk, gather_chunk_rows, max_reply_bytes

log = logging.getLogger("engram_mem.shard.server")


def _rpc(method):
    """Decode, count, time, and map engram-mem errors to gRPC statuses (one place for all handlers).

    Handlers get raw bytes (see _handlers) and the request is parsed here, so that undecodable
    bytes become InvalidArgument like any other bad input instead of gRPC's UNKNOWN."""
    name = method.__name__

    async def abort(self, context, e: Exception):
        if isinstance(e, EngramMemError):
            code, cls = getattr(grpc.StatusCode, e.code), type(e).__name__
        else:  # a bug, not bad input: log it, keep serving
            log.exception("shard %s: %s failed", self.store.shard_id, name)
            code, cls = grpc.StatusCode.INTERNAL, "EngramMemError"
            e = EngramMemError(f"shard {self.store.shard_id}: internal error in {name}: {type(e).__name__}: {e}")
        self.metrics.error(name, code.name, cls)
        context.set_trailing_metadata((("engram-error", cls),))
        await context.abort(code, str(e))

    if name == "Gather":  # a server-streaming handler is an async generator
        @functools.wraps(method)
        async def stream(self, raw, context):
            t0 = time.perf_counter()
            self.metrics.request(name)
            try:
                async for item in method(self, decode_request(name, raw), context):
                    yield item
            except Exception as e:  # noqa: BLE001 - every error becomes a status
                await abort(self, context, e)
            finally:
                self.metrics.observe(name, time.perf_counter() - t0)
        return stream

    @functools.wraps(method)
    async def unary(self, raw, context):
        t0 = time.perf_counter()
        self.metrics.request(name)
        try:
            out = method(self, decode_request(name, raw), context)
            return (await out) if inspect.isawaitable(out) else out
        except Exception as e:  # noqa: BLE001
            await abort(self, context, e)
        finally:
            self.metrics.observe(name, time.perf_counter() - t0)
    return unary


class ShardServicer:
    def __init__(self, store: ShardStore, node_ip: str = "", node_id: str = ""):
        self.store, self.node_ip, self.node_id = store, node_ip, node_id
        self.metrics = ShardMetrics(store.shard_id, store)
        self.replica_acks = None   # async acks(lsn) of a primary with replica_ack=all (replication.ReplicaFeed)

    # ---- the requests both transports serve (this gRPC servicer and data_server.DataServer) ----
    def gather_plan(self, request: pb.GatherRequest):
        """(table shard, local row indices) of a Gather, checked (ready, epoch, ids, reply size)."""
        store = self.store
        store.check_ready(request.epoch)
        ts, ids = store.parse_ids(request.table, request.ids)
        _check_reply_size(store, ts, ids.size)
        return ts, store._local_rows(ts, ids)

    def gather_block(self, ts, rows: np.ndarray, local: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """rows[local] (into out[:len(local)] if given): the one copy a gathered row takes on a shard."""
        store = self.store
        store._prefetch(ts, local)  # disk-backed rows: read ahead (storage/disk.py)
        # mode="clip": numpy buffers take(out=) under the default mode="raise" (a second copy of every
        # row); the local rows are in range by construction (ids checked, slots owned: gather_plan).
        chunk = np.empty((local.size, rows.shape[1]), rows.dtype) if out is None else out[:local.size]
        np.take(rows, local, axis=0, out=chunk, mode="clip")
        store._touch(ts, local)  # disk-backed rows: the page budget
        self.metrics.moved("gathered", chunk.shape[0], chunk.nbytes)
        return chunk

    # Write and Push are applied at once and acknowledged only when their log record is written
    # (the log's group commit: every request that arrives meanwhile shares the next write), and,
    # under replica_ack=all, when every in-sync replica has applied it.
    async def _acknowledgeable(self, lsn: int) -> None:
        if self.store.log is not None:
            await self.store.log.wait(lsn)
        if self.replica_acks is not None:
            await self.replica_acks(lsn)

    async def write(self, request: pb.WriteRequest, rows) -> int:
        n, lsn = self.store.write(request.table, request.ids, rows, dtype=request.dtype or None,
                                  epoch=request.epoch, client=request.client, seq=request.seq)
        await self._acknowledgeable(lsn)
        self.metrics.moved("written", n, len(rows))
        return n

    async def push(self, request: pb.PushRequest, grads) -> int:
        step = request.step
        lr = step.lr if step.HasField("lr") else None
        n, lsn = self.store.push(request.table, request.ids, grads, dtype=request.dtype or "float32",
                                 lr=lr, step=step.step, epoch=request.epoch, client=request.client,
                                 seq=request.seq)
        await self._acknowledgeable(lsn)
        self.metrics.moved("pushed", n, len(grads))
        return n

    write_reply = staticmethod(lambda n: pb.WriteReply(rows_written=n))
    push_reply = staticmethod(lambda n: pb.PushReply(rows_updated=n))

    # ---- gRPC handlers -------------------------------------------------------------------
    @_rpc
    async def Gather(self, request: pb.GatherRequest, context):
        ts, local = self.gather_plan(request)
        step = gather_chunk_rows(request.chunk_rows, ts.spec.row_bytes)
        rows = ts.rows  # one buffer for the whole reply, even if the table grows meanwhile
        for start in range(0, max(local.size, 1), step):
            yield encode_rows_chunk(self.gather_block(ts, rows, local[start:start + step]))

    @_rpc
    async def Write(self, request: pb.WriteRequest, context):
        return self.write_reply(await self.write(request, request.rows))

    @_rpc
    async def Push(self, request: pb.PushRequest, context):
        return self.push_reply(await self.push(request, request.grads))

    @_rpc
    def Describe(self, request, context):
        d = self.store.describe()
        local = same_host(context.peer())  # shm paths mean nothing (and reveal too much) off this node
        if not local:
            d["layout_path"] = ""
        tables = []
        for name, t in d["tables"].items():
            s = t["spec"]
            tables.append(pb.TableInfo(
                name=name, rows=s["rows"], dim=s["dim"], dtype=s["dtype"], seed=s["seed"],
                init_std=s["init_std"], num_slots=s["num_slots"], slot_rows=(s["rows"] + s["num_slots"] - 1) // s["num_slots"],
                owned_slots=np.asarray(t["owned_slots"], dtype="<i4").tobytes(),
                optimizer=json.dumps(t["optimizer"]), shm_path=t["shm_path"] if local else "", resident_rows=t["resident_rows"],
                frame_of=np.asarray(t["frame_of"], dtype="<i4").tobytes(), frames=t["frames"]))
        return pb.DescribeReply(shard_id=d["shard_id"], epoch=d["epoch"], node_ip=self.node_ip,
                                node_id=self.node_id, tables=tables, layout_path=d["layout_path"],
                                layout_version=d["layout_version"])

    @_rpc
    def Stats(self, request, context):
        m = self.metrics.summary()
        uptime = time.time() - self.metrics.started
        gathered = m["bytes"].get("gathered", 0)
        return pb.StatsReply(
            shard_id=self.store.shard_id, uptime_s=uptime, requests=m["requests"], errors=m["errors"],
            rows_gathered=m["rows"].get("gathered", 0), bytes_sent=gathered, rows_pushed=m["rows"].get("pushed", 0),
            rows_written=m["rows"].get("written", 0),
            # lifetime means: rates over a window are Prometheus' job (rate()) or `engram-mem status`'s
            requests_per_s=sum(m["requests"].values()) / max(uptime, 1e-9), gather_gbps=gathered / max(uptime, 1e-9) / 1e9,
            table_bytes=self.store.table_bytes(), rss_bytes=psutil.Process().memory_info().rss,
            optimizer_state_bytes=self.store.state_bytes())

    @_rpc
    def Health(self, request, context):
        store = self.store
        status = pb.HealthReply.SERVING if store.ready else pb.HealthReply.NOT_READY
        return pb.HealthReply(status=status, message=store.not_ready_reason, epoch=store.epoch)


def _check_reply_size(store: ShardStore, ts, n_ids: int) -> None:
    limit = max_reply_bytes(store.max_request_bytes)
    if n_ids * ts.spec.row_bytes > limit:
        raise RequestTooLarge(f"table {ts.spec.name!r}: a reply of {n_ids} rows x {ts.spec.row_bytes} bytes is over "
                              f"the {limit}-byte reply limit; ask for at most {limit // ts.spec.row_bytes} ids per Gather")


def _handlers(servicer: ShardServicer) -> grpc.GenericRpcHandler:
    # Requests arrive as raw bytes (no request_deserializer): _rpc parses them, so bad bytes get a
    # defined status. Gather replies are pre-encoded RowsChunk bytes.
    ident = lambda b: b  # noqa: E731
    table = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=ident,
            response_serializer=lambda m: m.SerializeToString())
        for name in ("Write", "Push", "Describe", "Stats", "Health")
    }
    table["Gather"] = grpc.unary_stream_rpc_method_handler(
        servicer.Gather, request_deserializer=ident, response_serializer=ident)
    return grpc.method_handlers_generic_handler(SERVICE, table)


def server_options(max_request_bytes: int) -> list[tuple[str, int]]:
    # The transport accepts twice the application limit, so that the servicer (not gRPC) rejects
    # an oversized request with a message that names the table and field.
    limit = 2 * max_request_bytes + (1 << 20)
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0)]


def _auth_interceptor(server: "ShardServer") -> AuthInterceptor:
    m = server.servicer.metrics

    def refused(rpc: str, error: str, code: str) -> None:
        m.request(rpc)
        m.error(rpc, code, error)

    server._auth = AuthInterceptor(server.security, refused, what=f"shard {server.store.shard_id}")
    return server._auth


class ShardServer:
    """Runs the servicer on a uvloop event loop in a daemon thread."""

    def __init__(self, store: ShardStore, host: str = "127.0.0.1", port: int = 0, node_id: str = "",
                 security: Security | dict | None = None, metrics_port: int | None = 0,
                 data_plane: bool = True):
        self.store, self.host, self.port = store, host, port
        self.data_plane = data_plane  # also serve bulk rows over framed TCP (data_server.py), unless TLS
        self.servicer = ShardServicer(store, node_ip=host, node_id=node_id)
        # Always authenticated: without given credentials the server makes its own (tests read them here).
        self.security = security if isinstance(security, Security) else Security.from_dict(security)
        self.metrics_port = metrics_port
        self.metrics_address = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._grace = 2.0
        self.address = ""
        self.data_address = ""   # "host:port" of the bulk data plane; "" where it is not served
        self._data = None

    def start(self, timeout: float = 30.0) -> str:
        import uvloop

        started = threading.Event()
        error: list[BaseException] = []

        async def serve():
            self._stopping = asyncio.Event()
            self._server = grpc.aio.server(options=server_options(self.store.max_request_bytes),
                                           interceptors=[_auth_interceptor(self)])
            self._server.add_generic_rpc_handlers([_handlers(self.servicer)])
            self.port = self.security.add_port(self._server, f"{self.host}:{self.port}")
            await self._server.start()
            self.address = f"{self.host}:{self.port}"
            if self.data_plane and not self.security.tls:  # the data plane speaks no TLS: clients use gRPC
                from engram_mem.shard.data_server import DataServer

                self._data = DataServer(self.servicer, lambda: self.security, self.host)
                self.data_address = f"{self.host}:{await self._data.start()}"
            started.set()
            await self._stopping.wait()
            if self._data is not None:
                await self._data.stop()
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
        if self.metrics_port is not None:
            self.metrics_address = self.servicer.metrics.serve(self.host, self.metrics_port)
        return self.address

    def set_credentials(self, security: Security | dict) -> None:
        """Accept a new set of credentials from the next call on (TLS files take effect on restart)."""
        self.security = security if isinstance(security, Security) else Security.from_dict(security)
        self._auth.security = self.security

    def stop(self, grace: float = 2.0) -> None:
        if self._loop is None or self._loop.is_closed() or self._thread is None:
            return
        self._grace = grace
        self.servicer.metrics.stop()
        try:
            self._loop.call_soon_threadsafe(self._stopping.set)
        except RuntimeError:  # the loop already closed
            pass
        self._thread.join(timeout=grace + 10)
