"""MemoryClient: the Python API of a memory cluster, and `connect()` to get one.

    with engram_mem.connect() as mem:                 # see connect() for which cluster you get
        mem.create_table("t", rows=1_000_000, dim=256)
        fut = mem.gather_async("t", ids)               # ids: int64, any shape
        ...                                            # compute while the rows travel
        rows = fut.result()                            # ids.shape + (256,)
        mem.push("t", ids, grads, lr=1e-3)             # duplicate ids' gradients are summed first

The control plane (tables, placement, shard addresses) comes from the controller actor through
Ray; the data plane is gRPC straight to the shards (channel.py), from one uvloop event loop on a
background thread. This class is the front: validation is validate.py's, cutting a request into
per-shard parts routing.py's, retrying retry.py's. A gather de-duplicates its ids, splits them by shard, sends the per-shard requests at
once, receives the streamed chunks into one buffer grouped by shard, and only then (in
`result()`, on the caller's thread) expands them back to the ids' order and shape.

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
import concurrent.futures
import logging
import threading
import time

import grpc
import numpy as np

from engram_mem.security import ClientSecurity, client_security
from engram_mem.client.channel import CALL_ERRORS, ShardChannels, call_error, rpc_error
from engram_mem.config import DEFAULT_NAME, ClusterConfig
from engram_mem.errors import (EngramMemError, InvalidArgument, NotReady, ReadOnlyTable, ShardUnavailable,
                               StaleEpoch, Unavailable, UnknownTable)
from engram_mem.client.gather_future import GatherFuture, Reshaped
from engram_mem.optim import OptimizerSpec
from engram_mem.pb.v1 import memory_pb2 as pb
from engram_mem.client.retry import RETRYABLE, RetryPolicy
from engram_mem.client.routing import ClusterView, dest_rows, slot_aligned_chunks, split_by_shard
from engram_mem.table import TableSpec, from_float32, np_dtype
from engram_mem.validate import check_grads, check_ids, check_lr, check_rows_finite
from engram_mem.wire import ids_bytes, max_reply_bytes
from engram_mem.client.write_future import WriteFuture

log = logging.getLogger("engram_mem.client.api")


class MemoryClient:
    def __init__(self, controller, *, on_close=None, retry_timeout: float = 60.0, worker: str = "",
                 client_id: str | None = None, security: dict | None = None, read_only: bool = False,
                 read_replicas: bool | None = None):
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
        self._chans = ShardChannels(2 * self.max_request_bytes + (1 << 20), ClientSecurity(**security))
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
        self._rr = 0
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

    async def _recover(self, view: ClusterView, e: Exception) -> None:
        """After a retryable error: a new placement (StaleEpoch), or new shard addresses (a shard
        restarted). Shards are found through their own Ray actors, so this works while the
        controller is down."""
        loop = asyncio.get_running_loop()
        try:
            if isinstance(e, StaleEpoch):
                await loop.run_in_executor(None, self.refresh)
            elif isinstance(e, ShardUnavailable):
                # Only the failed address gets a new channel: the others carry other requests' calls.
                if e.address:
                    self._chans.forget(e.address)
                await loop.run_in_executor(None, self._relocate, view)
        except Exception as err:  # noqa: BLE001 - the controller or an actor is restarting: retried
            log.debug("recovering from %s: %s", e, err)

    def _relocate(self, view: ClusterView, only: list[dict] | None = None) -> None:
        """Re-read the address of every member (or of `only`) of `view` from its actor (waits while one restarts)."""
        from engram_mem.config import NAMESPACE

        ray = self._ray
        members = only if only is not None else [m for r in range(len(view.shard_ids)) for m in view.members(r)]
        refs = []
        for m in members:
            try:
                refs.append((m, ray.get_actor(m.get("actor"), namespace=NAMESPACE).info.remote()))
            except (ValueError, TypeError):  # gone: the cluster was re-sharded; the controller knows
                self.refresh()
                return
        for m, ref in refs:
            try:
                info = ray.get(ref, timeout=self.retry_timeout)
            except Exception as err:  # noqa: BLE001 - keep the old address; the caller retries
                log.debug("%s: %s", m.get("actor"), err)
                continue
            with self._view_lock:
                if self._view.epoch == view.epoch and info["shard_id"] in self._view.shards:
                    self._view = self._view.with_shard(info)

    # ---- replicas: which member to read --------------------------------------------------
    def _read_members(self, view: ClusterView, rank: int) -> list[dict]:
        """The members to read shard `rank` from, in the order to try them: members not marked down
        first (rotated for a client that spreads reads, else the primary first), then the others."""
        members = view.members(rank)
        if len(members) == 1:
            return members
        now = time.monotonic()
        up = [m for m in members if self._down.get(m["address"], 0.0) <= now]
        if self.read_replicas and len(up) > 1:
            k = self._rr % len(up)
            self._rr += 1
            up = up[k:] + up[:k]
        return up + [m for m in members if m not in up]

    def member_up(self, address: str) -> bool:
        return self._down.get(address, 0.0) <= time.monotonic()

    def _mark_down(self, view: ClusterView, member: dict, e: Exception) -> None:
        """Skip a member that failed a read for a second; look up a dead one's new address meanwhile."""
        self.failovers += 1
        address = member["address"]
        self._down[address] = time.monotonic() + 1.0
        log.debug("read from %s failed (%s); next member", address, e)
        if isinstance(e, ShardUnavailable) and address not in self._relocating:
            self._relocating.add(address)
            self._chans.forget(address)

            def relocate():
                try:
                    self._relocate(view, [member])
                finally:
                    self._relocating.discard(address)

            asyncio.get_running_loop().run_in_executor(None, relocate)

    async def _after_pending(self, name: str) -> None:
        pending = self._pending.get(name)
        if pending:
            await asyncio.gather(*list(pending), return_exceptions=True)

    def _track(self, name: str, fut: asyncio.Future) -> None:
        s = self._pending.setdefault(name, set())
        s.add(fut)
        fut.add_done_callback(s.discard)

    # ---- gather ----------------------------------------------------------------------------
    def gather(self, name: str, ids, *, as_torch: bool = False, device=None):
        """Rows for `ids` (int64, any shape): ids.shape + (dim,), numpy (or torch with as_torch/device).

        bfloat16 tables come back as uint16 bit patterns in numpy, and as torch.bfloat16 in torch."""
        return self.gather_async(name, ids, as_torch=as_torch, device=device).result()

    def gather_async(self, name: str, ids, *, as_torch: bool = False, device=None) -> GatherFuture:
        t = self._table(name)
        flat, shape = self._ids(t.spec, ids)
        uniq, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
        if uniq.size == flat.size:  # distinct: rows arrive straight into place, in request order
            send, dest, dups = flat, None, None
        else:
            # Ask for each id once, at its first occurrence; rows land there as they arrive and the
            # few repeats are copied from their first occurrence at the end (no full expansion pass).
            dest = np.sort(first)
            send = flat[dest]
            repeat = np.ones(flat.size, dtype=bool)
            repeat[dest] = False
            rep = np.nonzero(repeat)[0]
            dups = (rep, first[inverse[rep]])
        inner = self._chans.submit(self._gather(name, send, dest, flat.size, dups))
        return GatherFuture(Reshaped(inner, tuple(shape) + (t.spec.storage_dim,)), t.spec.dtype, as_torch=as_torch,
                            device=device, spec=t.spec)

    async def _gather(self, name: str, send: np.ndarray, dest: np.ndarray | None, n_out: int,
                      dups: tuple[np.ndarray, np.ndarray] | None):
        """Rows of the distinct ids `send` into out[dest] (out[:len(send)] if dest is None); then
        out[dups[0]] = out[dups[1]] for repeated ids. Returns out [n_out, dim]."""
        await self._after_pending(name)

        async def attempt(view: ClusterView):
            t = view.table(name)
            grouped, parts, order = split_by_shard(t, send, len(view.shard_ids))
            out = np.empty((n_out, t.spec.storage_dim), dtype=t.spec.storage_dtype)
            await asyncio.gather(*(self._gather_part(view, name, rank, grouped[a:b], out, a,
                                                     dest_rows(dest, order, a, b))
                                   for rank, a, b in parts if b > a))
            if dups is not None and dups[0].size:
                out[dups[0]] = out[dups[1]]
            return out

        return await self._retrying(f"gather {name!r}", attempt)

    async def _gather_part(self, view: ClusterView, name: str, rank: int, ids: np.ndarray, out: np.ndarray,
                           start: int, dest: np.ndarray | None):
        """One shard's rows, from the first of its members that answers (see _read_members)."""
        members = self._read_members(view, rank)
        for i, m in enumerate(members):
            try:
                return await self._gather_from(m["address"], view.epoch, name, ids, out, start, dest)
            except EngramMemError as e:
                # The last member's error goes to the caller (retried, or what the primary refuses); a
                # replica's error of any kind, and a primary that is down or not ready, fail over.
                if i == len(members) - 1 or (m.get("member", 0) == 0 and not isinstance(e, (ShardUnavailable,
                                                                                            NotReady))):
                    raise
                self._mark_down(view, m, e)

    async def _gather_from(self, address: str, epoch: int, name: str, ids: np.ndarray, out: np.ndarray,
                           start: int, dest: np.ndarray | None):
        """Stream one member's rows into out[start:start+len(ids)], or scattered to out[dest]."""
        gather = self._chans.stubs(address).gather
        dim, dtype = out.shape[1], out.dtype
        max_ids = min(self.max_request_bytes // 8,  # and a reply within the shard's limit (wire.max_reply_bytes)
                      max(1, max_reply_bytes(self.max_request_bytes) // (dim * dtype.itemsize)))
        for first in range(0, ids.size, max_ids):
            sub = ids[first:first + max_ids]
            pos, end = first, first + sub.size
            try:
                async for chunk in gather(pb.GatherRequest(table=name, ids=ids_bytes(sub), epoch=epoch,
                                                           chunk_rows=self.chunk_rows)):
                    rows = np.frombuffer(chunk, dtype=dtype).reshape(-1, dim)
                    k = rows.shape[0]
                    if pos + k > end:
                        raise EngramMemError(f"shard {address} sent more rows than asked for")
                    if dest is None:
                        out[start + pos:start + pos + k] = rows
                    else:
                        out[dest[pos:pos + k]] = rows
                    pos += k
            except CALL_ERRORS as e:
                raise call_error(e, address) from None
            if pos != end:
                raise ShardUnavailable(f"shard {address}: gather reply ended early ({pos} of {end} rows)")

    # ---- write and push --------------------------------------------------------------------
    def write(self, name: str, ids, rows, key: tuple[str, int] | None = None, timeout: float | None = None) -> int:
        """write_async(...).result(timeout): rows written, or a typed error (see push)."""
        return self.write_async(name, ids, rows, key=key).result(timeout)

    def write_async(self, name: str, ids, rows, key: tuple[str, int] | None = None) -> WriteFuture:
        """Set rows (the last of duplicate ids wins). key=(client id, seq) overrides the client's own
        idempotency key: a new client retrying a dead one's request with its key applies it once."""
        t = self._table(name)
        flat, _ = self._ids(t.spec, ids)
        rows, dtype = self._rows(t.spec, rows, flat.size, "rows")
        # Last write wins among duplicates: keep each id's last occurrence.
        check_rows_finite(t.spec, flat, from_float32(rows, t.spec.dtype) if dtype != t.spec.dtype else rows)
        rev_uniq, rev_idx = np.unique(flat[::-1], return_index=True)
        keep = flat.size - 1 - rev_idx
        return self._send(name, "write", rev_uniq, rows[keep], dtype, None, 0, key=key)

    def push(self, name: str, ids, grads, lr: float | None = None, step: int = 0,
             key: tuple[str, int] | None = None, timeout: float | None = None) -> int:
        """push_async(...).result(timeout): rows updated, applied exactly once. Otherwise a typed
        error and nothing else: the shard's own refusal (InvalidArgument, ...: not applied),
        Unavailable (no shard reached before retry_timeout or `timeout`: not applied) or
        MaybeApplied (a shard may have applied it: retry with key=e.key to apply it once)."""
        return self.push_async(name, ids, grads, lr=lr, step=step, key=key).result(timeout)

    def push_async(self, name: str, ids, grads, lr: float | None = None, step: int = 0,
                   key: tuple[str, int] | None = None) -> WriteFuture:
        """Send a sparse gradient. Duplicate ids are summed here; NaN/Inf anywhere rejects the whole push.
        Applied exactly once however often it is retried (idempotency key; `key` as in write_async)."""
        import torch

        t = self._table(name)
        if t.spec.is_bytes:
            raise ReadOnlyTable(f"table {name!r} holds {t.spec.dtype} rows, which take write (import) but not push; "
                                f"train a float32 or bfloat16 table and quantize it on export")
        flat, _ = self._ids(t.spec, ids)
        g = grads.detach().to("cpu", torch.float32) if hasattr(grads, "detach") else \
            torch.from_numpy(np.asarray(grads, dtype=np.float32))
        g = g.reshape(flat.size, -1) if flat.size else g.reshape(0, t.spec.dim)
        if g.shape != (flat.size, t.spec.dim):
            raise InvalidArgument(f"table {name!r}: field 'grads' has shape {tuple(g.shape)}; "
                                  f"expected ({flat.size}, {t.spec.dim})")
        # The whole request is checked here, before it is split: no shard applies a part another refuses.
        check_grads(t.spec, flat, g.numpy(), self._view.raw["config"]["max_grad_abs"])
        if lr is not None:
            check_lr(t.spec, lr, self._view.raw["config"]["max_lr"])
        if flat.size > 1 and not bool(np.all(flat[1:] > flat[:-1])):  # not already sorted and distinct
            uniq, inv = np.unique(flat, return_inverse=True)
            if uniq.size != flat.size:
                g = torch.zeros(uniq.size, t.spec.dim).index_add_(0, torch.from_numpy(inv), g)
            else:
                g = torch.empty_like(g).index_copy_(0, torch.from_numpy(inv), g)
            flat = uniq
        return self._send(name, "push", flat, g.numpy(), "float32", lr, step, key=key)

    def _rows(self, spec: TableSpec, rows, n: int, field: str) -> tuple[np.ndarray, str]:
        if hasattr(rows, "detach"):
            import torch

            rows = rows.detach().cpu()
            rows = rows.view(torch.uint16).numpy() if rows.dtype == torch.bfloat16 else rows.numpy()
        rows = np.asarray(rows)
        if spec.dtype == "fp8_e4m3" and rows.dtype == np.float32:  # quantized here: the wire carries bytes
            from engram_mem.quant import quantize

            rows = quantize(rows.reshape(n, spec.dim) if n else rows.reshape(0, spec.dim), spec.block)
        if rows.dtype == np.float32 and not spec.is_bytes:
            dtype = "float32"
        elif rows.dtype == np_dtype(spec.dtype):
            dtype = spec.dtype
        else:
            raise InvalidArgument(f"table {spec.name!r}: field {field!r} has dtype {rows.dtype}; expected float32 "
                                  f"or the table's {spec.dtype}")
        width = spec.storage_dim if dtype == spec.dtype else spec.dim
        rows = rows.reshape(n, -1) if n else rows.reshape(0, width)
        if rows.shape[1] != width:
            raise InvalidArgument(f"table {spec.name!r}: field {field!r} has dim {rows.shape[1]}; table dim is {width}")
        return np.ascontiguousarray(rows), dtype

    def _send(self, name: str, kind: str, uniq: np.ndarray, rows: np.ndarray, dtype: str, lr, step: int,
              key: tuple[str, int] | None = None) -> WriteFuture:
        if self._closed:
            raise Unavailable(f"{kind} to table {name!r}: the client is closed; nothing was sent", table=name,
                              kind=kind, key=key)
        req = WriteFuture(self._chans.loop, name, kind)

        async def run():
            seq = await self._take_seq() if key is None else None
            req.key = (self.client_id, seq) if key is None else tuple(key)
            deadline = time.monotonic() + self.retry_timeout  # one deadline for every part of the request
            try:
                fut = asyncio.ensure_future(self._send_ids(req, uniq, rows, dtype, lr, step, deadline))
                self._track(name, fut)
                return await fut
            finally:
                if seq is not None:
                    self._release_seq(seq)

        def start():
            self._requests.add(req)
            req.add_done_callback(self._requests.discard)
            req.start(run())

        with self._unacked_lock:  # counted on the caller's thread, so flush() can skip the loop when zero
            self._unacked[name] = self._unacked.get(name, 0) + 1
        req.add_done_callback(lambda _f: self._acked(name))
        self._chans.loop.call_soon_threadsafe(start)
        return req

    async def _take_seq(self) -> int:
        """The next sequence number, keeping every request in flight within the shards' window."""
        from engram_mem.storage.dedup import WINDOW

        if self._seq_free is None:
            self._seq_free = asyncio.Condition()
        async with self._seq_free:
            await self._seq_free.wait_for(lambda: not self._inflight or self._seq + 1 - min(self._inflight) < WINDOW // 2)
            self._seq += 1
            self._inflight.add(self._seq)
            return self._seq

    def _release_seq(self, seq: int) -> None:
        self._inflight.discard(seq)

        async def notify():
            async with self._seq_free:
                self._seq_free.notify_all()

        asyncio.ensure_future(notify())

    async def _send_ids(self, req: WriteFuture, ids, rows, dtype, lr, step, deadline) -> int:
        """Send sorted distinct ids (and their rows) to their shards; retry each shard's part on its
        own (re-split if the placement changed), so a part that succeeded is never sent again. The
        key makes any part sent twice apply once. Past the deadline: req.unresolved(), typed."""
        name = req.table
        policy = RetryPolicy(self.retry_timeout, f"{req.kind} {name!r}", deadline=deadline)
        while True:  # a placement naming a shard this client does not know yet: re-read the cluster
            view = self._view
            try:
                grouped, parts, order = split_by_shard(view.table(name), ids, len(view.shard_ids))
                break
            except StaleEpoch as e:
                if time.monotonic() > deadline:
                    raise req.unresolved(f"gave up after {self.retry_timeout:.0f}s: {e}") from None
                await self._recover(view, e)
                await policy.pause(e)
        data = rows if order is None else rows[order]

        async def part(rank: int, a: int, b: int) -> int:
            policy = RetryPolicy(self.retry_timeout, f"{req.kind} {name!r}", deadline=deadline)
            sid = view.shard_ids[rank]
            req.waiting.add(sid)
            while True:
                v = self._view
                if v.epoch != view.epoch:  # re-routed under the new placement
                    n = await self._send_ids(req, grouped[a:b], data[a:b], dtype, lr, step, deadline)
                    req.waiting.discard(sid)
                    return n
                try:
                    n = await self._send_part(v, req, rank, grouped[a:b], data[a:b], dtype, lr, step)
                    req.waiting.discard(sid)
                    req.acked.add(sid)
                    return n
                except RETRYABLE as e:
                    if isinstance(e, ShardUnavailable) and e.sent:
                        req.touched.add(sid)
                    if time.monotonic() > deadline:
                        raise req.unresolved(f"gave up after {self.retry_timeout:.0f}s: {e}") from None
                    await self._recover(v, e)
                    await policy.pause(e)

        tasks = [asyncio.ensure_future(part(rank, a, b)) for rank, a, b in parts if b > a]
        try:
            replies = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:  # one part failed or the request was stopped: the others stop too,
                t.cancel()   # and none of them sends anything after this request has ended
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return int(sum(replies))

    def _acked(self, name: str) -> None:
        with self._unacked_lock:
            self._unacked[name] -= 1

    async def _send_part(self, view, req: WriteFuture, rank, ids, rows, dtype, lr, step) -> int:
        name, kind, (client, seq) = req.table, req.kind, req.key
        address = view.address(rank)
        stubs = self._chans.stubs(address)
        slot_rows = view.table(name).spec.slot_rows
        done = 0
        for a, b in slot_aligned_chunks(ids, slot_rows, max(1, self.max_request_bytes // max(rows.shape[1] * rows.itemsize, 8))):
            i, r = ids_bytes(ids[a:b]), memoryview(np.ascontiguousarray(rows[a:b])).cast("B")
            try:
                if kind == "write":
                    reply = await stubs.write(pb.WriteRequest(table=name, ids=i, rows=bytes(r), dtype=dtype,
                                                           epoch=view.epoch, client=client, seq=seq))
                    done += reply.rows_written
                else:
                    info = pb.StepInfo(step=step, worker=self.worker)
                    if lr is not None:
                        info.lr = lr
                    reply = await stubs.push(pb.PushRequest(table=name, ids=i, grads=bytes(r), dtype=dtype,
                                                          epoch=view.epoch, step=info, client=client, seq=seq))
                    done += reply.rows_updated
            except CALL_ERRORS as e:
                raise call_error(e, address) from None
        return done

    def flush(self, name: str | None = None, timeout: float | None = None) -> None:
        """Wait until every write and push sent so far (to table `name`, or to any) is applied."""
        with self._unacked_lock:
            if not any(v for k, v in self._unacked.items() if name is None or k == name):
                return

        async def wait_all():
            for n in ([name] if name is not None else list(self._pending)):
                await self._after_pending(n)

        self._chans.submit(wait_all()).result(timeout)

    def gather_distinct_async(self, name: str, ids: np.ndarray) -> concurrent.futures.Future:
        """Rows [n, dim] for distinct int64 ids, in their order (no de-duplication pass, no expansion)."""
        t = self._table(name)
        flat, _ = self._ids(t.spec, ids)

        async def run():
            return await self._gather(name, flat, None, flat.size, None)

        return self._chans.submit(run())

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


# ---- connect -----------------------------------------------------------------------------------
def connect(address: str | None = None, shards: int = 2, *, name: str = DEFAULT_NAME,
            retry_timeout: float = 60.0, credential: str | None = None, tls: dict | None = None,
            read_only: bool = False, read_replicas: bool | None = None, **cluster) -> MemoryClient:
    """A client of a memory cluster.

    - address given: attach to the memory cluster `name` in the Ray cluster at that address.
    - address None, Ray already initialized in this process: attach to `name` there, or start one
      with `shards` shards that lives as long as the client.
    - address None otherwise: attach to the cluster `engram-mem up` started on this machine, or
      start an embedded local Ray cluster (node address 127.0.0.2) with a memory cluster of
      `shards` shards; both live as long as the client.

    credential / tls: for clients that do not get them from the cluster through Ray (auth.py):
    tls = {"ca": path, "cert": path, "key": path (mutual TLS), "server_name": name}. read_only asks
    the cluster for its read-only credential (Gather, Describe, Stats, Health only).
    read_replicas: spread gathers over a replicated shard's members (default: when read_only).

    Extra keyword arguments (data_dir, cpus_per_shard, ...) configure a cluster this call starts.
    """
    sec = dict(retry_timeout=retry_timeout, read_only=read_only, read_replicas=read_replicas,
               security=client_security(credential, tls) if credential or tls else None)
    import ray

    from engram_mem.control import local
    from engram_mem.control.controller import get_controller, start_controller

    def own(ctl, shutdown_ray: bool):
        def close():
            try:
                ray.get(ctl.shutdown.remote(), timeout=120)
                ray.kill(ctl, no_restart=True)
            finally:
                if shutdown_ray:
                    ray.shutdown()
        return close

    if address is not None:
        if not ray.is_initialized():
            local.attach_ray(address)
        ctl = get_controller(name)
        if ctl is None:
            raise EngramMemError(f"no memory cluster named {name!r} in the Ray cluster at {address}; "
                                 f"start one with `engram-mem up --address {address}`")
        return MemoryClient(ctl, **sec)
    if ray.is_initialized():
        ctl = get_controller(name)
        if ctl is not None:
            return MemoryClient(ctl, **sec)
        ctl = start_controller(ClusterConfig(name=name, shards=shards, **cluster))
        return MemoryClient(ctl, on_close=own(ctl, False), **sec)
    state = local.read_state(name)
    if state is not None:
        local.attach_ray(state["ray_address"])
        ctl = get_controller(name)
        if ctl is not None:
            return MemoryClient(ctl, on_close=ray.shutdown, **sec)
        ray.shutdown()
    local.init_embedded_ray(shards=shards)
    try:
        ctl = start_controller(ClusterConfig(name=name, shards=shards, **cluster))
    except BaseException:
        ray.shutdown()
        raise
    return MemoryClient(ctl, on_close=own(ctl, True), **sec)
