"""RowFetcher: a worker's tiered read path into the memory pool, plus its gradient pushes.

Tiers, fastest first, the way a CXL-style pool is used:
  1. the worker's hot-row cache (cache.py), bounded in bytes, frequency-admitted
  2. the same-node tier (nodelocal.py): shards on this node, read in place from shared memory
  3. remote shards, over gRPC (client.py)

    f = RowFetcher(client, cache_bytes={"engram.l1": 256 << 20})
    fut = f.fetch_async("engram.l1", ids)    # starts at once on the fetcher's thread
    uniq, rows, inverse = fut.result()       # distinct ids [U], their rows [U, D]; ids == uniq[inverse]
    f.push_async("engram.l1", uniq, grads, lr=..., step=...)

Fetches de-duplicate their ids. A fetch waits for this worker's earlier pushes to the same table
(read-your-writes), and a push drops its rows from the cache, so a training worker never reads a
row older than its own last update. Rows updated by *other* workers reach a worker's cache only
when the cached copy is evicted: give training workers no cache, or accept that staleness.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time

import numpy as np

from engram_mem.cache import RowCache
from engram_mem.table import np_dtype


class RowFetcher:
    def __init__(self, client, *, cache_bytes: dict[str, int] | None = None, node_local: bool = True,
                 threads: int = 1):
        self.client = client
        self.caches: dict[str, RowCache] = {}
        for name, nbytes in (cache_bytes or {}).items():
            spec = client.view.table(name).spec
            if nbytes > 0:
                self.caches[name] = RowCache(nbytes, spec.dim, np_dtype(spec.dtype))
        self.tier = None
        if node_local:
            from engram_mem.nodelocal import NodeLocalTier

            self.tier = NodeLocalTier(client)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="engram-fetch")
        self._lock = threading.Lock()
        self.stats: collections.Counter = collections.Counter()

    # ---- reads -----------------------------------------------------------------------------
    def fetch_async(self, name: str, ids: np.ndarray) -> concurrent.futures.Future:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._pool.submit(self.fetch, name, ids)

    def fetch(self, name: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distinct ids [U], their rows [U, D], inverse [N]) for ids of any shape, flattened."""
        t0 = time.perf_counter()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        view = self.client.view
        t = view.table(name)
        uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        out = np.empty((uniq.size, t.spec.dim), dtype=np_dtype(t.spec.dtype))
        need = np.ones(uniq.size, dtype=bool)
        cache = self.caches.get(name)
        if cache is not None:
            cache.record(uniq, counts)
            hit, rows = cache.lookup(uniq)
            out[hit] = rows
            need = ~hit
        miss_pos = np.nonzero(need)[0]
        self.client.flush(name)  # read-your-writes, also for the shared-memory path
        remote_pos = miss_pos
        if self.tier is not None and miss_pos.size:
            ranks = t.placement[uniq[miss_pos] // t.spec.slot_rows]
            served = np.zeros(miss_pos.size, dtype=bool)
            for rank in self.tier.local_ranks():
                sel = np.nonzero(ranks == rank)[0]
                if sel.size:
                    rows = self.tier.read(name, rank, uniq[miss_pos[sel]])
                    if rows is not None:
                        out[miss_pos[sel]] = rows
                        served[sel] = True
            remote_pos = miss_pos[~served]
            self.stats["node_local_rows"] += int(served.sum())
        if remote_pos.size:
            out[remote_pos] = self.client.gather_distinct_async(name, uniq[remote_pos]).result()
            self.stats["remote_rows"] += int(remote_pos.size)
        if cache is not None and miss_pos.size:
            cache.admit(uniq[miss_pos], out[miss_pos])
        self.stats["fetches"] += 1
        self.stats["ids"] += int(ids.size)
        self.stats["unique_ids"] += int(uniq.size)
        self.stats["cache_hits"] += int(uniq.size - miss_pos.size)
        self.stats["fetch_s"] += time.perf_counter() - t0
        return uniq, out, inverse

    # ---- writes ----------------------------------------------------------------------------
    def push_async(self, name: str, ids: np.ndarray, grads, lr: float | None = None, step: int = 0):
        """Push a gradient (ids distinct or not) and forget those rows in the cache."""
        cache = self.caches.get(name)
        if cache is not None:
            cache.invalidate(np.asarray(ids, dtype=np.int64))
        self.stats["pushes"] += 1
        return self.client.push_async(name, ids, grads, lr=lr, step=step)

    def summary(self) -> dict:
        s = dict(self.stats)
        lookups = sum(c.stats["lookups"] for c in self.caches.values())
        hits = sum(c.stats["hits"] for c in self.caches.values())
        s["cache_hit_rate"] = hits / lookups if lookups else 0.0
        s["cache_bytes"] = sum(c.nbytes for c in self.caches.values())
        if self.tier is not None:
            s["node_local_fallbacks"] = self.tier.stats["fallbacks"]
        return s

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.tier is not None:
            self.tier.close()
