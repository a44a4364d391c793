"""hot_shares: how much of a batch's row reads the busiest shard and node serve, under the id
distribution, the worker cache and replicas (one draw of a random slot placement).

    from engram_mem.plan.hotspots import hot_shares
    hot_shares(model, workload, shards=256, nodes=32)
"""

from __future__ import annotations

import numpy as np

from engram_mem.plan.workload import Zipf

_MAX_HOT = 2_000_000


def hot_shares(m, wl, shards: int, nodes: int, dist=None, seed: int = 0) -> dict:
    """Shares of a batch's distinct cache-missing rows that the busiest shard and node serve."""
    shards, nodes = max(1, int(shards)), max(1, int(nodes))
    k, n_layers = m.rows_per_token, len(m.engram_layers)
    if dist is None:
        head = Zipf(rows=max(1, m.table_rows // k), s=wl.zipf_s)
        per_head_cache = wl.cache_rows / k
        draws, copies = wl.tokens, k * n_layers        # every head of every layer is its own hot set
    else:
        head, per_head_cache, draws, copies = dist, wl.cache_rows, wl.tokens * k, n_layers
    top = int(min(max(64, 8 * shards // max(1, copies) + int(per_head_cache)), _MAX_HOT // copies))
    p = head.top_probs(top)                                              # [top]
    q = -np.expm1(draws * np.log1p(-np.minimum(p, 1 - 1e-16)))          # P(row in a batch)
    cached = np.arange(p.size) < int(per_head_cache)                     # LFU cache holds the head
    q_hot = np.where(cached, 0.0, q)
    total = copies * head.distinct_missing(draws, per_head_cache)        # distinct misses per batch
    tail = max(0.0, total - copies * q_hot.sum())
    if total <= 0:
        return {"max_shard_share": 0.0, "max_node_share": 0.0, "mean_shard_share": 1 / shards,
                "hot_rows_placed": 0}
    rng = np.random.default_rng(seed)
    r = max(1, min(int(wl.replicas), shards))
    load = np.full(shards, tail / shards)
    rows = np.tile(q_hot, copies)
    for _ in range(r):   # each replica on its own random shard; reads split evenly over replicas
        load += np.bincount(rng.integers(0, shards, rows.size), weights=rows / r, minlength=shards)
    node_load = np.bincount(np.arange(shards) % nodes, weights=load, minlength=nodes)
    return {"max_shard_share": float(load.max() / total), "max_node_share": float(node_load.max() / total),
            "mean_shard_share": 1 / shards, "hot_rows_placed": int(rows.size)}
