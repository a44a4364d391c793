"""Replication: a shard's replicas follow its stream of changes, in order (primary-backup log shipping).

With `replicas=R` each shard is R actors on R different nodes: the primary (`<cluster>-shard-<id>`)
takes every Write and Push; the replicas (`<cluster>-shard-<id>-r<k>`) hold the same slots and
serve gathers, so inference workers read a copy on their own node and keep reading when a member
dies.

    primary                                   replica
    -------                                   -------
    follow(member, token) -> tables, slots    <- (re)joining: a new process, or told to resync
    copy_slots(t, slots) -> (lsn, rows...)    <- every slot, in batches: a per-slot cut
    start_follower(member, token)             <- records queued since follow() start to flow
    Follower thread: apply_records(token, batch) ->  replay each record on slots whose cut is older

Acknowledgement (`replica_ack`):
  - none (default): asynchronous, with a bounded, reported lag. A Write or Push is acknowledged
    once the primary's own log has it (its durability policy); the primary then ships the record
    to every replica in lsn order, and only records its log has written, so a replica is never
    ahead of what its primary recovers after a crash.
  - all: a Write or Push is acknowledged once its record is also applied on every *in-sync*
    replica: one whose follower has started (its full copy is done) and not been dropped. A
    replica that has not applied a record within `replica_ack_timeout_s` is dropped from the set
    (and rebuilds), so a hung replica delays writes by at most that long. A primary that lost its
    data directory (deleted, damaged, or on a node that is gone) restores from the in-sync
    replica that applied the most, and so loses nothing it acknowledged.

The backlog per replica is bounded (`replica_max_lag_bytes`): a replica that falls that far
behind (or whose call fails) is dropped and rebuilds itself by a full copy; how far each replica
trails is exported as `engram_mem_replica_lag_seconds` (the oldest change not yet applied there)
and shown by `engram-mem status`.

Tokens: every join gets a fresh token. A replica applies records only from the follower of its
current token, so a follower left over from before a restart can never apply twice or out of order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid

import numpy as np

from engram_mem.storage.wal import Record

log = logging.getLogger("engram_mem.shard.replication")


def shippable(lsn: int, kind: int, meta: dict, blobs) -> Record:
    """A change as a Record that pickles (its buffers copied out of the request)."""
    return Record(lsn, kind, dict(meta), [np.ascontiguousarray(b).tobytes() for b in blobs])


class Follower:
    """On the primary: one replica's queue of records and the thread that ships them."""

    def __init__(self, member: str, token: str, handle, wait_logged, max_lag_bytes: int,
                 on_broken, batch_bytes: int = 8 << 20, covered_lsn: int = 0, on_shipped=None):
        self.member, self.token, self.handle = member, token, handle
        self._wait_logged = wait_logged     # wait_logged(lsn): the primary's log has written lsn
        self.max_lag_bytes, self.batch_bytes = max_lag_bytes, batch_bytes
        self._on_broken = on_broken
        self._on_shipped = on_shipped       # on_shipped(): shipped_lsn moved (replica_ack=all waiters)
        self._q: collections.deque = collections.deque()   # (commit time, Record, bytes)
        self._bytes = 0
        self._cond = threading.Condition()
        self.closed = False
        self.started = False
        self.broken = ""
        self.shipped_lsn = covered_lsn      # applied there: its copy covers every change up to its join
        self.records = 0
        self._thread: threading.Thread | None = None

    def publish(self, rec: Record) -> None:
        """Queue a change (the primary's order lock is held: records arrive in lsn order)."""
        n = sum(len(b) for b in rec.blobs) + 256
        with self._cond:
            if self.closed:
                return
            if self._bytes + n > self.max_lag_bytes:
                self._break_locked(f"its backlog passed {self.max_lag_bytes} bytes")
                return
            self._q.append((time.time(), rec, n))
            self._bytes += n
            self._cond.notify()

    def start(self) -> None:
        self.started = True
        self._thread = threading.Thread(target=self._run, name=f"engram-follow-{self.member}", daemon=True)
        self._thread.start()

    def lag_seconds(self) -> float:
        """Age of the oldest change this replica has not applied (0 when it has them all)."""
        with self._cond:
            return time.time() - self._q[0][0] if self._q else 0.0

    def in_sync(self) -> bool:
        """Counted by replica_ack=all: copied, following, not dropped."""
        return self.started and not self.closed

    def drop(self, why: str) -> None:
        """Out of the in-sync set: it rebuilds from a full copy."""
        with self._cond:
            if not self.closed:
                self._break_locked(why)

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._q.clear()
            self._bytes = 0
            self._cond.notify_all()

    def _break_locked(self, why: str) -> None:
        self.closed, self.broken = True, why
        self._q.clear()
        self._bytes = 0
        self._cond.notify_all()
        threading.Thread(target=self._on_broken, args=(self,), daemon=True).start()

    def _run(self) -> None:
        import ray

        while True:
            with self._cond:
                while not self.closed and not self._q:
                    self._cond.wait(0.5)
                if self.closed:
                    return
                batch, size = [], 0
                for _t, rec, n in self._q:
                    if batch and size + n > self.batch_bytes:
                        break
                    batch.append(rec)
                    size += n
            try:
                self._wait_logged(batch[-1].lsn)
                applied = ray.get(self.handle.apply_records.remote(self.token, batch), timeout=120)
            except Exception as e:  # noqa: BLE001 - the replica died or hangs: it rejoins with a full copy
                with self._cond:
                    if not self.closed:
                        self._break_locked(f"shipping failed: {type(e).__name__}: {e}")
                return
            with self._cond:
                if self.closed:
                    return
                if not applied:  # the replica has re-joined since (a new token): this follower is stale
                    self.closed, self.broken = True, "replica re-joined with a new token"
                    return
                for _ in batch:
                    _t, _rec, n = self._q.popleft()
                    self._bytes -= n
                self.shipped_lsn = batch[-1].lsn
                self.records += len(batch)
            if self._on_shipped is not None:
                self._on_shipped()


class ReplicaFeed:
    """On the primary: its followers, fed from the store's commit tap (ShardStore.taps)."""

    def __init__(self, wait_logged, max_lag_bytes: int, ack_timeout_s: float = 10.0):
        self._wait_logged = wait_logged
        self.max_lag_bytes, self.ack_timeout_s = max_lag_bytes, ack_timeout_s
        self.followers: dict[str, Follower] = {}
        self._lock = threading.Lock()
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future]] = []

    def publish(self, lsn: int, kind: int, meta: dict, blobs) -> None:
        if not self.followers:
            return
        rec = shippable(lsn, kind, meta, blobs)
        for f in list(self.followers.values()):
            f.publish(rec)

    def add(self, member: str, token: str, handle, lsn: int) -> Follower:
        """A (paused) follower for `member` (replacing an older one) whose copy will cover every change
        up to `lsn`; caller holds the store's order lock."""
        f = Follower(member, token, handle, self._wait_logged, self.max_lag_bytes, self._broken,
                     covered_lsn=lsn, on_shipped=self._wake)
        with self._lock:
            old = self.followers.pop(member, None)
            self.followers[member] = f
        if old is not None:
            old.close()
            self._wake()
        return f

    # ---- replica_ack=all ------------------------------------------------------------------------
    def _acked_locked(self, lsn: int) -> bool:
        return all(f.shipped_lsn >= lsn for f in self.followers.values() if f.in_sync())

    def _wake(self) -> None:
        with self._lock:
            ready = [w for w in self._waiters if self._acked_locked(w[0])]
            self._waiters = [w for w in self._waiters if w not in ready]
        for _, loop, fut in ready:
            loop.call_soon_threadsafe(_resolve, fut)

    async def wait_acked(self, lsn: int) -> None:
        """Return once every in-sync replica has applied `lsn`; a replica that takes longer than
        ack_timeout_s is dropped from the set (it rebuilds), so this returns within about that."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            if self._acked_locked(lsn):
                return
            self._waiters.append((lsn, loop, fut))
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(fut), self.ack_timeout_s)
                return
            except asyncio.TimeoutError:
                for f in list(self.followers.values()):
                    if f.in_sync() and f.shipped_lsn < lsn:
                        f.drop(f"it did not apply lsn {lsn} within replica_ack_timeout_s={self.ack_timeout_s}")
                self._wake()   # the in-sync set left has it

    def start(self, member: str, token: str) -> bool:
        f = self.followers.get(member)
        if f is None or f.token != token:
            return False
        f.start()
        return True

    def _broken(self, f: Follower) -> None:
        """A follower gave up: forget it, and ask its replica to rebuild (a dead one does on restart)."""
        with self._lock:
            if self.followers.get(f.member) is f:
                del self.followers[f.member]
        self._wake()
        log.warning("replica %s dropped: %s; it rebuilds from a full copy", f.member, f.broken)
        try:
            f.handle.resync.remote(f.token)
        except Exception as e:  # noqa: BLE001 - gone for good (the cluster was scaled down)
            log.debug("resync of %s: %s", f.member, e)

    def lag_seconds(self) -> float:
        return max((f.lag_seconds() for f in list(self.followers.values())), default=0.0)

    def describe(self) -> dict:
        return {m: {"lag_s": f.lag_seconds(), "shipped_lsn": f.shipped_lsn, "records": f.records,
                    "in_sync": f.in_sync()}
                for m, f in list(self.followers.items())}

    def close(self) -> None:
        with self._lock:
            fs, self.followers = list(self.followers.values()), {}
        for f in fs:
            f.close()
        self._wake()


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class ReplicaSync:
    """On a replica (or a primary restoring from one): copy a source member's slots, then apply
    the records its follower ships."""

    def __init__(self, store, member: str, batch_bytes: int):
        self.store, self.member, self.batch_bytes = store, member, batch_bytes
        self.token = ""
        self.applied_lsn = 0
        self.following = False   # copied and following its primary: a source a restarted primary may restore from
        self.syncs = 0
        self.seconds = 0.0
        self._lock = threading.Lock()   # one sync at a time

    def sync(self, source, follow: bool = True) -> dict:
        """Make the store an exact copy of `source`'s tables and slots. With follow, register as its
        follower first, so every change after the copy arrives. Returns {"bytes", "seconds", "slots"}."""
        import ray

        from engram_mem.optim import OptimizerSpec
        from engram_mem.table import TableSpec

        with self._lock:
            t0 = time.perf_counter()
            store = self.store
            token = uuid.uuid4().hex if follow else ""
            with store.order:
                self.token, self.applied_lsn, self.following = token, 0, False
                store.set_ready(False, "copying its slots from the primary")
            info = ray.get(source.follow.remote(self.member if follow else None, token), timeout=300)
            wanted = {t["spec"]["name"]: t for t in info["tables"]}
            for name in [n for n, ts in store.tables.items() if n not in wanted or ts.uid != wanted[n]["uid"]]:
                store.drop_table(name)
            nbytes = slots_copied = 0
            for name, t in wanted.items():
                spec = TableSpec.from_dict(t["spec"])
                if name not in store.tables:
                    store.add_table(spec, [], OptimizerSpec.from_dict(t["optimizer"]), uid=t["uid"])
                elif store.tables[name].optimizer_spec.to_dict() != t["optimizer"]:
                    store.set_optimizer(name, t["optimizer"])
                slots = np.asarray(t["slots"], dtype=np.int64)
                store.keep_only_slots(name, slots)
                per = max(1, self.batch_bytes // max(1, spec.slot_rows * spec.row_bytes))
                for i in range(0, slots.size, per):
                    lsn, data = ray.get(source.copy_slots.remote(name, slots[i:i + per]), timeout=600)
                    store.install_copy(name, data, lsn)
                    nbytes += sum(img.nbytes for img in data.values())
                    slots_copied += len(data)
            store.set_epoch(info["epoch"])
            if follow and not ray.get(source.start_follower.remote(self.member, token), timeout=60):
                raise RuntimeError(f"{self.member}: the primary dropped this replica while it copied; rejoining")
            with store.order:
                store.lsn = max(store.lsn, info["lsn"])
                self.applied_lsn = max(self.applied_lsn, info["lsn"])
                self.following = follow
            if follow:   # a primary restoring from a replica is made ready by its owner, once it is durable
                store.set_ready(True)
            self.syncs += 1
            self.seconds = time.perf_counter() - t0
            return {"bytes": nbytes, "slots": slots_copied, "seconds": self.seconds}

    def apply(self, token: str, records: list[Record]) -> bool:
        """Apply shipped records in order; False if they come from a follower this replica left."""
        store = self.store
        with store.order:
            if token != self.token:
                return False
            for rec in records:
                if rec.lsn <= self.applied_lsn:
                    continue  # a resent batch: applied already
                store.replay(rec)
                self.applied_lsn = store.lsn = rec.lsn
        return True
