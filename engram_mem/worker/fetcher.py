"""RowFetcher: a worker's tiered read path into the memory pool, plus its gradient pushes.

Tiers, the way a CXL-style pool is used:
  1. the same-node tier (nodelocal.py): shards on this node, read in place from shared memory
  2. the worker's hot-row cache (cache.py), bounded in bytes, frequency-admitted, in front of
  3. remote shards, over gRPC (client.py)
The cache holds rows of remote shards only: this node's rows are already in this node's memory.

    f = RowFetcher(client, cache_bytes={"engram.l1": 256 << 20})
    fut = f.fetch_async("engram.l1", ids)    # starts at once on the fetcher's thread
    uniq, rows, inverse = fut.result()       # distinct ids [U] (grouped by shard), their rows [U, D]; ids == uniq[inverse]
    f.push_async("engram.l1", uniq, grads, lr=..., step=...)

Fetches de-duplicate their ids. A fetch waits for this worker's earlier pushes to the same table
(read-your-writes), and a push drops its rows from the cache, so a training worker never reads a
row older than its own last update. Rows updated by *other* workers reach a worker's cache only
when the cached copy is evicted: give training workers no cache, or accept that staleness.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from engram_mem.client.routing import shard_grouped
from engram_mem.worker.cache import RowCache

log = logging.getLogger("engram_mem.worker.fetcher")

INLINE_FINISH_ROWS = 4096  # fetches of at most this many distinct rows finish on the client's loop thread


@dataclass
class _Fetch:
    """A fetch between its local part (same-node tier, cache) and its remote part."""
    t0: float
    n_ids: int
    uniq: np.ndarray        # distinct ids [U]
    inverse: np.ndarray     # ids == uniq[inverse]
    out: np.ndarray         # rows [U, D], filled in as the tiers answer
    remote_pos: np.ndarray  # positions in uniq left for the remote shards (and offered to the cache)
    cache: RowCache | None
    noted: tuple | None     # the cache's (generation, admissions), noted before any row was read (RowCache.peek)
    counts: dict | None = None  # the caller's own tally of this fetch (the agent's per worker)
    spread: bool | None = None  # remote rows from every member of a replicated shard in turn (None: the client's way)
    asked: np.ndarray | None = None  # the ids looked up in the cache (their access is counted after the answer)


class RowFetcher:
    def __init__(self, client, *, cache_bytes: dict[str, int] | None = None, node_local: bool = True,
                 threads: int = 1):
        self.client = client
        self.caches: dict[str, RowCache] = {}
        self._uids: dict[str, str | None] = {}  # the table uid each cache holds rows of
        for name, nbytes in (cache_bytes or {}).items():
            spec = client.view.table(name).spec
            if nbytes > 0:
                self.caches[name] = RowCache(nbytes, spec.storage_dim, spec.storage_dtype)
                self._uids[name] = client.view.raw["tables"][name].get("uid")
        self.tier = None
        if node_local:
            from engram_mem.worker.nodelocal import NodeLocalTier

            self.tier = NodeLocalTier(client)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="engram-fetch")
        self._lock = threading.Lock()
        self.stats: collections.Counter = collections.Counter()

    # ---- reads -----------------------------------------------------------------------------
    def fetch_async(self, name: str, ids: np.ndarray, *, out: np.ndarray | None = None, node_local: bool = True,
                    cache: bool = True, tally: collections.Counter | None = None,
                    inline: bool = False, spread: bool | None = None) -> concurrent.futures.Future:
        """Start a fetch at once; the future gives what fetch() returns.

        out: rows land in out[:U] (at least [len(ids), storage_dim] of the table's storage dtype)
        instead of a new array: the fetch agent passes a worker's shared buffer. node_local / cache:
        this fetch may read the same-node tier / the hot-row cache (a worker sharing an agent that
        asked for neither). tally: a Counter this fetch's own counts are added to once it ends
        (fetches, ids, unique_ids, node_local_rows, cache_lookups, cache_hits, remote_rows).
        inline: run the local part on the calling thread (the agent's connection thread: one
        thread hand-off fewer per fetch) instead of the fetcher's. spread: read replicated shards
        from all their members in turn (a read-only worker's fetches through the agent), or the
        primary first; None: as the client does.

        The same-node and cache reads run on the fetcher's thread; a remote gather then goes out
        on the client's event loop without holding that thread, so the fetches of several Engram
        layers (issued one after another) are in flight together: one round trip, not one each."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        rows_out, out = out, concurrent.futures.Future()

        def begin():
            try:
                part = self._begin(name, ids, out=rows_out, node_local=node_local, use_cache=cache, tally=tally)
                part.spread = spread
                if part.remote_pos.size == 0:
                    answer(part, None)
                    return
                remote = self._gather_into(name, part)
                remote.add_done_callback(lambda r: hand_back(part, r))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                out.set_exception(e)

        def answer(part, remote_rows):
            # The caller has its rows first; the cache's bookkeeping (the access counts, admitting
            # the misses) comes after, off the path of the rows, from a copy of the misses taken
            # before the answer (the caller may reuse its buffer at once: the agent's slot).
            result = self._finish(part, remote_rows)
            booking = self._booking(part)
            out.set_result(result)
            self._book(booking)

        def hand_back(part, remote):  # on the client's loop thread: finish on the fetcher's
            if part.uniq.size <= INLINE_FINISH_ROWS:  # a small fetch (decode): no second hand-off
                finish(part, remote)
                return
            try:
                self._pool.submit(finish, part, remote)
            except RuntimeError:  # the fetcher is closing: finish here rather than never
                finish(part, remote)

        def finish(part, remote):
            try:
                rows = remote.result()
            except BaseException as e:  # noqa: BLE001
                out.set_exception(e)
                return
            answer(part, rows)

        if inline:
            begin()
        else:
            self._pool.submit(begin)
        return out

    def fetch(self, name: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distinct ids [U], their rows [U, D], inverse [N]) for ids of any shape, flattened."""
        part = self._begin(name, np.asarray(ids, dtype=np.int64).reshape(-1))
        remote = None
        if part.remote_pos.size:
            remote = self._gather_into(name, part).result()
        result = self._finish(part, remote)
        self._book(self._booking(part))
        return result

    def _gather_into(self, name: str, f: "_Fetch") -> concurrent.futures.Future:
        """The remote rows straight into the fetch's own array (no copy of the client's between):
        contiguous when every distinct id is remote, else at their positions."""
        every = f.remote_pos.size == f.uniq.size
        return self.client.gather_distinct_async(name, f.uniq[f.remote_pos], out=f.out,
                                                 dest=None if every else f.remote_pos, spread=f.spread)

    def _begin(self, name: str, ids: np.ndarray, out: np.ndarray | None = None, node_local: bool = True,
               use_cache: bool = True, tally: collections.Counter | None = None) -> "_Fetch":
        """De-duplicate, then serve what the same-node tier and the cache hold."""
        t0 = time.perf_counter()
        t = self.client.view.table(name)
        uniq, inverse = np.unique(ids, return_inverse=True)
        uniq, order = shard_grouped(t, uniq)   # each shard's rows then land contiguously: no scatter
        if order is not None:
            where = np.empty_like(order)
            where[order] = np.arange(order.size)
            inverse = where[inverse]
        if out is None:
            out = self.client.buffers.empty((uniq.size, t.spec.storage_dim), t.spec.storage_dtype)
        else:
            out = out[:uniq.size]
        self.client.flush(name)  # read-your-writes, also for the shared-memory path
        rest = np.arange(uniq.size)
        if self.tier is not None and node_local and uniq.size:
            ranks = t.placement[uniq // t.spec.slot_rows]
            served = np.zeros(uniq.size, dtype=bool)
            for rank in self.tier.local_ranks():
                sel = np.nonzero(ranks == rank)[0]
                if sel.size:
                    rows = self.tier.read(name, rank, uniq[sel])
                    if rows is not None:
                        out[sel] = rows
                        served[sel] = True
            rest = np.nonzero(~served)[0]
            with self._lock:
                self.stats["node_local_rows"] += int(uniq.size - rest.size)
        # The cache fronts remote shards only: this node's rows are already in this node's memory.
        cache, noted, remote_pos = self._cache(name) if use_cache else None, None, rest
        if cache is not None and rest.size:
            hit, rows, noted = cache.peek(uniq[rest])  # the access is counted after the answer (_book)
            out[rest[hit]] = rows
            remote_pos = rest[~hit]
        f = _Fetch(t0, ids.size, uniq, inverse, out, remote_pos, cache, noted,
                   asked=uniq[rest] if noted is not None else None)
        if tally is not None:
            f.counts = {"node_local_rows": int(uniq.size - rest.size), "unique_ids": int(uniq.size), "ids": int(ids.size),
                        "cache_lookups": int(rest.size) if cache is not None else 0,
                        "cache_hits": int(rest.size - remote_pos.size) if cache is not None else 0}
            f.counts["tally"] = tally
        return f

    def _finish(self, f: "_Fetch", remote_rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if remote_rows is not None:
            if remote_rows is not f.out:  # (rows gathered elsewhere) else they landed in place
                f.out[f.remote_pos] = remote_rows
        with self._lock:
            self.stats["fetches"] += 1
            self.stats["remote_rows"] += int(f.remote_pos.size) if remote_rows is not None else 0
            self.stats["ids"] += f.n_ids
            self.stats["unique_ids"] += int(f.uniq.size)
            self.stats["fetch_s"] += time.perf_counter() - f.t0
            if f.counts is not None:
                tally = f.counts.pop("tally")
                tally.update(f.counts, fetches=1, remote_rows=int(f.remote_pos.size) if remote_rows is not None else 0)
        return f.uniq, f.out, f.inverse

    @staticmethod
    def _booking(f: "_Fetch") -> tuple | None:
        """What the cache is told once the caller has the rows: the ids asked of it, and the misses
        fetched (their rows copied now: fancy indexing copies)."""
        if f.noted is None:  # no cache, or nothing asked of it
            return None
        return f.cache, f.asked, f.uniq[f.remote_pos], f.out[f.remote_pos], f.noted

    @staticmethod
    def _book(booking: tuple | None) -> None:
        if booking is not None:
            cache, asked, ids, rows, noted = booking
            try:
                cache.record_and_admit(asked, ids, rows, noted)
            except Exception:  # noqa: BLE001 - the fetch was answered; a cache that cannot book it only misses
                log.exception("hot-row cache: booking a fetch failed; its rows were not admitted")

    # ---- writes ----------------------------------------------------------------------------
    def push_async(self, name: str, ids: np.ndarray, grads, lr: float | None = None, step: int = 0,
                   key: tuple[str, int] | None = None):
        """Push a gradient (ids distinct or not) and forget those rows in the cache.

        The cache forgets them before the push is sent and again once it is registered with the
        client: a fetch that starts later waits for the push (read-your-writes); one already under
        way sees the second invalidation and does not admit what it read."""
        cache = self._cache(name)
        ids = np.asarray(ids, dtype=np.int64)
        if cache is not None:  # before the push is sent: no fetch can be served the row from here on
            cache.invalidate(ids)
        fut = self.client.push_async(name, ids, grads, lr=lr, step=step, key=key)
        if cache is not None:  # and after: a fetch that read the row meanwhile does not cache it
            cache.invalidate(ids)
        with self._lock:
            self.stats["pushes"] += 1
        return fut

    def _cache(self, name: str) -> RowCache | None:
        """The table's cache, emptied if the table was dropped and created again since it filled
        (a long-lived fetcher, the node's agent, outlives tables)."""
        cache = self.caches.get(name)
        if cache is not None:
            uid = self.client.view.raw["tables"].get(name, {}).get("uid")
            if self._uids.get(name) != uid:
                with self._lock:
                    if self._uids.get(name) != uid:
                        spec = self.client.view.table(name).spec
                        cache = self.caches[name] = RowCache(cache.capacity_bytes, spec.storage_dim, spec.storage_dtype)
                        self._uids[name] = uid
                    cache = self.caches[name]
        return cache

    def ensure_cache(self, name: str, nbytes: int) -> None:
        """A hot-row cache of at least nbytes for table `name` (a larger ask replaces a smaller
        cache, which starts empty)."""
        with self._lock:
            have = self.caches.get(name)
            if nbytes > 0 and (have is None or have.capacity_bytes < nbytes):
                spec = self.client.view.table(name).spec
                self.caches[name] = RowCache(nbytes, spec.storage_dim, spec.storage_dtype)
                self._uids[name] = self.client.view.raw["tables"][name].get("uid")

    def prune_caches(self) -> int:
        """Drop the caches of tables no longer in the client's view (or created again since):
        for a long-lived fetcher, the node's agent. Returns how many were dropped."""
        tables = self.client.view.raw["tables"]
        with self._lock:
            gone = [n for n in self.caches if n not in tables or tables[n].get("uid") != self._uids.get(n)]
            for n in gone:
                del self.caches[n]
                self._uids.pop(n, None)
        return len(gone)

    def clear_caches(self) -> None:
        for c in list(self.caches.values()):
            c.clear()

    def summary(self) -> dict:
        s = {k: 0 for k in ("fetches", "ids", "unique_ids", "node_local_rows", "remote_rows", "pushes", "fetch_s")}
        s.update(self.stats)
        s["cache_lookups"] = lookups = sum(c.stats["lookups"] for c in self.caches.values())
        s["cache_hits"] = hits = sum(c.stats["hits"] for c in self.caches.values())
        s["cache_hit_rate"] = hits / lookups if lookups else 0.0
        s["cache_bytes"] = sum(c.nbytes for c in self.caches.values())
        s["cache_bytes_by_table"] = {n: c.nbytes for n, c in self.caches.items()}
        if self.tier is not None:
            s["node_local_fallbacks"] = self.tier.stats["fallbacks"]
        return s

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.tier is not None:
            self.tier.close()
