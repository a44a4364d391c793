"""Scaling simulation: shards 64-1,024, workers 8-512, TCP vs RDMA vs a CXL pool, hot shards under Zipf.

    from engram_mem.plan.simulate import hot_shares, sweep
    hot_shares(model, workload, shards=256, nodes=32)      # the busiest shard's and node's share of row reads
    sweep(model, base_workload, hardware_by_name, shards=[64, 256, 1024], workers=[8, 64, 512])

Why analytic and not discrete-event: a worker's step is a fixed pipeline (one fetch per Engram
layer per batch, in flight during the blocks before it) repeated millions of times, so the
steady state is set by averages and by the busiest resource, not by transients. What a discrete-
event run would add is queueing delay near saturation; we take it from an M/D/1 queue at each
shared resource (waiting time rho / (2 (1 - rho)) service times), and past saturation the
throughput falls to capacity / demand. The one effect averages hide, the hot shard, is sampled
exactly: the hottest rows are placed on shards by a seeded random hash (as the slot map does,
up to slot granularity), with their per-batch read probability 1 - (1 - p_i)^n (a worker reads
a row at most once per batch, so a hot row's load is bounded by the batch rate), replicas split a
row's reads evenly, the worker cache removes the head, and the tail is spread evenly.
"""

from __future__ import annotations

import dataclasses


from engram_mem.plan.hotspots import hot_shares



def queue_factor(rho: float) -> float:
    """M/D/1 waiting + service, in service times; inf at or past saturation."""
    return float("inf") if rho >= 1 else 1 + rho / (2 * (1 - rho))


def point(m, wl, hw, shards: int, dist=None) -> dict:
    """Throughput per worker and penalty at one (shards, workers, tier) point, with the bottleneck named."""
    from engram_mem.plan.planner import baseline, timeline

    t = hw.rows_tier
    tl = timeline(m, wl, hw, dist)
    base = baseline(m, wl, hw, dist)
    n_layers = len(m.engram_layers)
    nodes = max(1, shards // hw.shards_per_node)
    demand_rows = wl.workers * tl["rows"]["missing"] * n_layers / tl["step_s"]       # rows/s, all workers
    bytes_row = max(m.row_bytes, t.min_read_bytes)
    hs = hot_shares(m, wl, shards, nodes, dist)
    if t.kind == "cxl_pool":
        pools = max(1, -(-wl.workers // t.readers))
        caps = {"pool": t.aggregate_gbps * 1e9 * pools}
    else:
        caps = {"network": t.aggregate_gbps * 1e9 * nodes}
    rho = {name: demand_rows * bytes_row / cap for name, cap in caps.items()}
    rho["hot shard"] = demand_rows * hs["max_shard_share"] * bytes_row / (hw.shard_gbps * 1e9)
    if t.kind != "cxl_pool" and nodes > 1:   # with one node, the hot node is the network
        rho["hot node"] = demand_rows * hs["max_node_share"] * bytes_row / (t.aggregate_gbps * 1e9)
    rho["worker link"] = tl["rows"]["missing"] * n_layers * bytes_row / tl["step_s"] / (t.per_reader_gbps() * 1e9)
    first = max(rho, key=rho.get)
    worst = rho[first]
    if worst < 1:   # queueing stretches the fetch; re-derive the exposed part with a slower tier
        slow = dataclasses.replace(t, latency_s=t.latency_s * queue_factor(worst),
                                   link_gbps=t.link_gbps / queue_factor(worst))
        step = timeline(m, wl, hw, dist, tier=slow)["step_s"]
        tps = wl.tokens / step
    else:
        step = tl["step_s"] * worst
        tps = wl.tokens / step
    return {"shards": shards, "nodes": nodes, "workers": wl.workers, "tier": t.name, "replicas": wl.replicas,
            "cache_rows": wl.cache_rows, "tokens_per_s_per_worker": tps, "tokens_per_s_total": tps * wl.workers,
            "penalty_pct": 100 * (1 - base["step_s"] / step), "utilization": rho, "bottleneck": first if worst >= 0.7 else "none",
            "max_shard_share": hs["max_shard_share"]}


def sweep(m, wl, hardware: dict, shards: list[int], workers: list[int], dist=None) -> list[dict]:
    out = []
    for name, hw in hardware.items():
        for s in shards:
            for w in workers:
                out.append({"hardware": name, **point(m, wl.replace(workers=w), hw, s, dist)})
    return out
