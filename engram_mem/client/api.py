"""MemoryClient: the Python API of a memory cluster (get one with `connect()`, connect.py).

    with engram_mem.connect() as mem:                 # see connect() for which cluster you get
        mem.create_table("t", rows=1_000_000, dim=256)
        fut = mem.gather_async("t", ids)               # ids: int64, any shape
        ...                                            # compute while the rows travel
        rows = fut.result()                            # ids.shape + (256,)
        mem.push("t", ids, grads, lr=1e-3)             # duplicate ids' gradients are summed first

The control plane (tables, placement, shard addresses) comes from the controller actor through
Ray; bulk rows travel straight to the shards over their framed-TCP data plane (transport/), other
calls over gRPC (channel.py), all from one uvloop event loop on a background thread. This class is the front: the cluster view, tables and the control plane;
gathers are reads.py's, writes and pushes writes.py's, which member serves a request and finding
a restarted one members.py's; validation is validate.py's, cutting a request into per-shard
parts routing.py's, retrying retry.py's.

Consistency: a client's gather of a table waits for that client's earlier pushes and writes to
the table, so it always sees its own updates (read-your-writes). Stale placements, restarting
shards and slot moves are retried transparently until `retry_timeout`.

Replicas (`replicas=R`, replication.py): writes and pushes go to each shard's primary. Gathers of a
read-only client (inference) are spread over all members; other clients read the primary, which
keeps read-your-writes. Either way a gather fails over at once to the next member when one does
not answer or is not ready (a dead member is skipped for a second while its new address is
looked up in the background), so a killed replica or primary costs a gather one extra round trip.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading

import grpc
import numpy as np

from engram_mem.transport.grpc_channels import ShardChannels, rpc_error
from engram_mem.client.buffers import ReplyBuffers
from engram_mem.client.members import Members
from engram_mem.client.reads import Reads
from engram_mem.client.retry import RETRYABLE, RetryPolicy
from engram_mem.client.routing import ClusterView
from engram_mem.client.write_future import WriteFuture
from engram_mem.client.writes import Writes
from engram_mem.config import DATA_PLANES
from engram_mem.errors import InvalidArgument, UnknownTable
from engram_mem.optim import OptimizerSpec
from engram_mem.pb.v1 import memory_pb2 as pb
from engram_mem.security import ClientSecurity
from engram_mem.table import TableSpec
from engram_mem.transport.connector import RowConnector
from engram_mem.transport.grpc_connector import GrpcConnector
from engram_mem.transport.tcp_connector import TcpConnector
from engram_mem.validate import check_ids

log = logging.getLogger("engram_mem.client.api")


class MemoryClient(Reads, Writes, Members):
    def __init__(self, controller, *, on_close=None, retry_timeout: float = 60.0, worker: str = "",
                 client_id: str | None = None, security: dict | None = None, read_only: bool = False,
                 read_replicas: bool | None = None, data_plane: str | None = None):
        import uuid

        import ray

        self._ray = ray
        # Idempotency keys: (client_id, seq) per write or push; a retry reuses its key (dedup.py).
        self.client_id = client_id or uuid.uuid4().hex
        self._seq = 0
        self._inflight: set[int] = set()   # seqs sent and not answered (loop thread only)
        self._seq_free: asyncio.Condition | None = None
        self.controller = controller
        self._on_close = on_close
        self.retry_timeout = retry_timeout
        self.worker = worker
        self._view = ClusterView(ray.get(controller.describe.remote()))
        cfg = self._view.raw["config"]
        self.max_request_bytes = cfg["max_request_bytes"]
        if security is None:  # through Ray: the controller hands out the credential (auth.py)
            security = ray.get(controller.client_security.remote(read_only))
        client_sec = ClientSecurity(**security)
        self.security = client_sec  # its credential is also what a worker shows its node's fetch agent
        self._chans = ShardChannels(2 * self.max_request_bytes + (1 << 20), client_sec)
        # Bulk rows: the framed-TCP data plane where the shard serves one (not under TLS), else gRPC.
        self.data_plane = data_plane or cfg.get("data_plane", "grpc")
        if self.data_plane not in DATA_PLANES:
            raise InvalidArgument(f"data_plane {self.data_plane!r} is not one of {', '.join(DATA_PLANES)}")
        self._grpc_rows = GrpcConnector(self._chans, self.max_request_bytes, lambda: self.chunk_rows)
        self._tcp_rows = (TcpConnector(client_sec.credential, self.max_request_bytes)
                          if self.data_plane == "tcp" and not client_sec.tls_ca else None)
        self._copied = collections.Counter()  # repeat_bytes: repeated ids' rows copied by gathers (loop thread)
        self.buffers = ReplyBuffers()  # the arrays of gathers given no out=, reused once the caller drops them
        self._pending: dict[str, set] = {}   # table -> in-flight writes/pushes (loop thread only)
        self._requests: set[WriteFuture] = set()  # writes/pushes not yet ended (loop thread only)
        self._unacked: dict[str, int] = {}   # table -> writes/pushes sent and not yet answered
        self._unacked_lock = threading.Lock()
        self._view_lock = threading.Lock()
        self._closed = False
        self.chunk_rows = 0  # rows per Gather reply chunk; 0 = the server default (~1 MB)
        self.read_replicas = read_only if read_replicas is None else read_replicas  # spread gathers over members
        self._down: dict[str, float] = {}   # member address -> skip it until (monotonic time)
        self._relocating: set[str] = set()
        self._rr = collections.Counter()  # spread reads: each shard's next member
        self.failovers = 0

    # ---- context manager -------------------------------------------------------------------
    def __enter__(self) -> "MemoryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every write and push still in flight (each ends Unavailable or MaybeApplied, naming
        its key), then close the channels."""
        if self._closed:
            return
        self._closed = True

        async def stop_all():
            await asyncio.gather(*(r.stop_here("the client was closed") for r in list(self._requests)))

        if self._chans.loop.is_running():
            try:
                self._chans.submit(stop_all()).result(timeout=30)
            except Exception as e:  # noqa: BLE001 - closing goes on
                log.warning("close: stopping requests in flight: %s", e)
        if self._tcp_rows is not None and self._chans.loop.is_running():
            try:
                self._chans.submit(self._tcp_rows.aclose()).result(timeout=10)
            except Exception as e:  # noqa: BLE001
                log.warning("close: data plane connections: %s", e)
        self._chans.close()
        if self._on_close is not None:
            self._on_close()

    # ---- cluster view ----------------------------------------------------------------------
    @property
    def view(self) -> ClusterView:
        return self._view

    def refresh(self, check_shards: bool = False) -> ClusterView:
        """Re-read the placement and addresses (asking the controller to restart dead shards first)."""
        ref = self.controller.check_shards.remote() if check_shards else self.controller.describe.remote()
        view = ClusterView(self._ray.get(ref))
        with self._view_lock:
            if view.epoch >= self._view.epoch:
                self._view = view
        return self._view

    def describe(self) -> dict:
        return self.refresh().raw

    def tables(self) -> dict[str, TableSpec]:
        return {n: t.spec for n, t in self.refresh().tables.items()}

    def _table(self, name: str):
        """The table's view; a table created after this client attached is found by re-reading the cluster."""
        try:
            return self._view.table(name)
        except UnknownTable:
            return self.refresh().table(name)

    # ---- control plane ---------------------------------------------------------------------
    def create_table(self, name: str, rows: int, dim: int, dtype: str = "float32", seed: int = 0, *,
                     init_std: float = 1.0, num_slots: int | None = None,
                     optimizer: OptimizerSpec | dict | str | None = None, exist_ok: bool = False) -> TableSpec:
        kw = {} if num_slots is None else {"num_slots": num_slots}
        spec = TableSpec(name, rows, dim, dtype=dtype, seed=seed, init_std=init_std, **kw)
        return self.create_table_spec(spec, optimizer=optimizer, exist_ok=exist_ok)

    def create_table_spec(self, spec: TableSpec, optimizer=None, exist_ok: bool = False) -> TableSpec:
        if isinstance(optimizer, str):
            optimizer = {"name": optimizer}
        opt = optimizer if isinstance(optimizer, OptimizerSpec) else OptimizerSpec.from_dict(optimizer)
        self._view = ClusterView(self._ray.get(self.controller.create_table.remote(spec.to_dict(), opt.to_dict(),
                                                                                   exist_ok)))
        return spec

    def drop_table(self, name: str) -> None:
        self._view = ClusterView(self._ray.get(self.controller.drop_table.remote(name)))

    def set_optimizer(self, name: str, optimizer: OptimizerSpec | dict | str) -> None:
        if isinstance(optimizer, str):
            optimizer = {"name": optimizer}
        opt = optimizer if isinstance(optimizer, OptimizerSpec) else OptimizerSpec.from_dict(optimizer)
        self._view = ClusterView(self._ray.get(self.controller.set_optimizer.remote(name, opt.to_dict())))

    def scale(self, shards: int) -> ClusterView:
        self._view = ClusterView(self._ray.get(self.controller.scale.remote(shards)))
        return self._view

    def checkpoint(self, target_dir: str | None = None) -> dict:
        """A consistent cut of every shard: into the data directory, or into target_dir (see restore)."""
        return self._ray.get(self.controller.checkpoint.remote(target_dir))

    def restore(self, source_dir: str) -> dict:
        """Replace the tables' rows and optimizer state by the checkpoint in source_dir."""
        out = self._ray.get(self.controller.restore.remote(source_dir))
        self.refresh()
        return out

    # ---- data plane: requests --------------------------------------------------------------
    def _connector(self, member: dict) -> RowConnector:
        """The transport for bulk rows to `member`: its data plane if it serves one, else gRPC."""
        if self._tcp_rows is not None and member.get("data_address"):
            return self._tcp_rows
        return self._grpc_rows

    def _forget(self, address: str) -> None:
        """A member failed: new connections (gRPC channel, data plane) to it from now on."""
        self._grpc_rows.forget(address)
        if self._tcp_rows is not None:
            self._tcp_rows.forget(address)

    def transport_counts(self) -> dict:
        """Per transport ("grpc", "tcp"): requests sent (gather, write, push) and the bytes of
        gathered rows that arrived straight into the caller's array (direct_bytes) or were copied
        there from a transport buffer (staged_bytes). See transport/connector.py. "client": bytes of
        repeated ids' rows copied from one occurrence (repeat_bytes; client/routing.repeat_plan), and
        the arrays of gathers given no out= that reused a freed one's memory or needed new memory
        (reply_arrays_reused / _fresh; client/buffers.py)."""
        out = {"grpc": dict(self._grpc_rows.counts),
               "client": dict(self._copied, reply_arrays_reused=self.buffers.reused,
                              reply_arrays_fresh=self.buffers.fresh)}
        if self._tcp_rows is not None:
            out["tcp"] = dict(self._tcp_rows.counts)
        return out

    def _ids(self, spec: TableSpec, ids) -> tuple[np.ndarray, tuple]:
        shape = tuple(ids.shape) if hasattr(ids, "shape") else np.shape(ids)
        return check_ids(spec, ids), shape

    async def _retrying(self, what: str, attempt):
        """Run attempt(view) until it succeeds or a non-retryable error; re-read the view between tries."""
        policy = RetryPolicy(self.retry_timeout, what)
        while True:
            view = self._view
            try:
                return await attempt(view)
            except RETRYABLE as e:
                policy.give_up_if_late(e)
                log.debug("%s: %s; retrying", what, e)
                await self._recover(view, e)
                await policy.pause(e)


























    def describe_shard(self, address: str, timeout: float = 30.0):
        """The Describe reply of the shard at `address` (its tables, frame layout, shm files)."""
        async def run():
            try:
                return await self._chans.stubs(address).describe(pb.DescribeRequest())
            except grpc.aio.AioRpcError as e:
                raise rpc_error(e, address) from None

        return self._chans.submit(run()).result(timeout)

    # ---- introspection ---------------------------------------------------------------------
    def stats(self) -> list[dict]:
        """Per-shard counters and rates (the Stats RPC of every shard)."""
        async def one(address):
            try:
                return _as_dict(await self._chans.stubs(address).stats(pb.StatsRequest()))
            except grpc.aio.AioRpcError as e:
                return {"error": str(rpc_error(e, address))}

        view = self.refresh()

        async def run():
            return await asyncio.gather(*(one(view.address(r)) for r in range(len(view.shard_ids))))

        out = self._chans.submit(run()).result(30)
        for rank, d in enumerate(out):
            d.update(address=view.address(rank), node_ip=view.shards[view.shard_ids[rank]]["node_ip"])
        return out

    def health(self) -> list[dict]:
        view = self.refresh()

        async def run():
            return await asyncio.gather(*(self._chans.stubs(view.address(r)).health(pb.HealthRequest())
                                          for r in range(len(view.shard_ids))))

        return [dict(_as_dict(h), status=pb.HealthReply.Status.Name(h.status))
                for h in self._chans.submit(run()).result(30)]


def _as_dict(msg) -> dict:
    """A flat protobuf message as a dict with native Python values (maps become dicts)."""
    out = {}
    for f in msg.DESCRIPTOR.fields:
        v = getattr(msg, f.name)
        out[f.name] = dict(v) if f.message_type is not None and f.message_type.GetOptions().map_entry else v
    return out


