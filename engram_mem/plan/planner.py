"""The planner: from a model, a workload and hardware tiers to a cluster plan and a predicted penalty.

    from engram_mem.plan.planner import Hardware, plan
    p = plan(MODEL_PRESETS["v4.1-flash"], Workload(mode="decode", batch=64, context=4096, workers=64),
             Hardware(device=DEVICE_PRESETS["h800"], rows_tier=TIER_PRESETS["rdma-400g"]))
    print(format_plan(p)); json.dumps(p)

What it computes, per batch shape (one forward of `batch` x `seq_len` tokens on one worker):
  - compute: each block costs fixed + max(FLOPs / (peak x MFU), weights read / memory bandwidth);
    FLOPs = 2 x active params x tokens + 4 x hidden x tokens x attended context; training x3.
  - rows: a token reads `rows_per_token` rows per Engram layer; a batch reads the distinct ones
    (from the id distribution), the worker cache serves the hottest, the rest come from the rows'
    tier. All layers' fetches start with the forward (the model prefetches them together), share
    the worker's link, and each completes after one round trip plus its bytes and the bytes queued
    before it; layer j's rows are needed after the embedding and blocks 0..j-1 (its prefetch
    window). exposed wait = sum over layers of max(0, ready - needed); prefetch off: every fetch is
    exposed in full. ahead (prefill): a batch's fetches went out `ahead` forwards before its own
    (the next prompt chunk, a queue of batches), so each window grows by that many steps of
    compute; the link then carries one batch's fetches per step, and a step lasts at least that.
  - where compute shares the CPU with the read path (this machine), the read path's CPU time adds
    to the step, and a prefetch progresses `stretch` times slower while the blocks run (both
    measured by --calibrate); on a GPU neither applies.
  - training also pushes the gradients of the distinct rows; the next step's fetch waits for it.
  - penalty = 1 - (baseline step) / (step), the baseline reading the rows from `baseline_tier`
    without prefetch (the paper's and the benchmarks' reference: rows already in the worker).
  - bandwidth each tier must deliver at that throughput, hot shard and hot node from hashed
    placement under the id distribution (hotspots.hot_shares), and which saturates first; past
    100% the throughput falls by that factor.
Everything is arithmetic on the inputs: a plan for any preset takes well under a second.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from engram_mem.plan.presets import Device, ModelShape
from engram_mem.plan.hotspots import hot_shares
from engram_mem.plan.tiers import GB, TIER_PRESETS, PlanInputError, Tier
from engram_mem.plan.workload import Workload, Zipf


@dataclass(frozen=True)
class Hardware:
    device: Device
    rows_tier: Tier                       # where the tables live: a row the cache misses is read here
    cache_tier: Tier | None = None        # the worker's hot-row cache (HBM, host DRAM)
    baseline_tier: Tier = TIER_PRESETS["hbm"]
    shards_per_node: int = 8
    shard_gbps: float = 10.0              # one shard's serving rate (assumed for a native server)
    shard_update_s_per_row: float = 2e-8  # the shard's row-wise Adam per row
    shares_cpu: bool = False              # the model computes on the CPU cores the read path uses
    usable_fraction: float = 0.85         # of a memory node's capacity, for rows (the rest: OS, buffers)
    link_binds: str = "line rate"         # what sets rows_tier's per-client rate (tiers.driven_by)

    def __post_init__(self):
        if self.shards_per_node < 1 or self.shard_gbps <= 0 or not 0 < self.usable_fraction <= 1:
            raise PlanInputError("hardware: shards_per_node >= 1, shard_gbps > 0 and 0 < usable_fraction <= 1 needed")


def block_time_s(m: ModelShape, dev: Device, tokens: int, attended: float) -> float:
    flops = 2 * m.active_params_per_block * tokens + 4 * m.hidden * tokens * attended
    weights = m.touched_params_per_block(tokens) * m.param_bytes
    return dev.block_fixed_s + max(flops / (dev.peak_flops * dev.mfu), weights / (dev.mem_gbps * GB))


def head_time_s(m: ModelShape, dev: Device, tokens: int) -> float:
    if not m.vocab:
        return 0.0
    return max(2 * m.hidden * m.vocab * tokens / (dev.peak_flops * dev.mfu), m.hidden * m.vocab * m.param_bytes / (dev.mem_gbps * GB))


def batch_rows(m: ModelShape, wl: Workload, dist=None) -> dict:
    """Rows one batch reads per Engram layer: lookups, distinct, distinct the cache misses, hit rate."""
    tokens = wl.tokens
    k = m.rows_per_token
    if dist is None or isinstance(dist, Zipf):
        # K hash heads, each its own range of rows/K with the n-gram distribution: tokens draws each.
        head = Zipf(rows=max(1, m.table_rows // k), s=dist.s if dist is not None else wl.zipf_s)
        distinct = k * head.distinct(tokens)
        missing = k * head.distinct_missing(tokens, wl.cache_rows / k, wl.cache_policy)
        hit = head.hit_rate(wl.cache_rows / k, wl.cache_policy)
    else:
        distinct = dist.distinct(tokens * k)
        missing = dist.distinct_missing(tokens * k, wl.cache_rows, wl.cache_policy)
        hit = dist.hit_rate(wl.cache_rows, wl.cache_policy)
    return {"lookups": tokens * k, "distinct": distinct, "missing": missing, "cached": distinct - missing,
            "lookup_hit_rate": hit}


def timeline(m: ModelShape, wl: Workload, hw: Hardware, dist=None, tier: Tier | None = None,
             prefetch: bool | None = None) -> dict:
    """One batch on one worker: compute, each Engram layer's window and fetch, exposed wait, step time."""
    tier = tier or hw.rows_tier
    prefetch = wl.prefetch if prefetch is None else prefetch
    dev = hw.device
    attended = wl.ctx / 2 if wl.mode in ("prefill", "train") else wl.ctx
    t_block = block_time_s(m, dev, wl.tokens, attended)
    t_head = head_time_s(m, dev, wl.tokens)
    fwd = m.layers * t_block + t_head
    compute = 3 * fwd if wl.mode == "train" else fwd
    r = batch_rows(m, wl, dist)
    readers = tier.readers
    bw = tier.per_reader_gbps(readers) * GB
    miss_bytes = tier.read_bytes(r["missing"], m.row_bytes)
    cache_s = 0.0
    if hw.cache_tier is not None and r["cached"] > 0:
        cache_s = hw.cache_tier.fetch_s(r["cached"], m.row_bytes)
    one = (tier.latency_s if r["missing"] > 0 else 0.0) + miss_bytes / bw + cache_s   # one layer's fetch alone
    push = 0.0
    if wl.mode == "train":   # distinct rows' fp32 gradients to the shards, applied there; the next fetch waits
        lat = tier.latency_s if tier.push_latency_s is None else tier.push_latency_s
        per_row = hw.shard_update_s_per_row if tier.push_s_per_row is None else tier.push_s_per_row
        push = lat + r["distinct"] * (m.grad_row_bytes / bw + per_row)
    # Where compute shares the CPU with the read path, a fetch progresses `stretch` times slower
    # while the blocks run, and at full speed once the model waits for it.
    stretch = tier.stretch if hw.shares_cpu else 1.0
    lead = wl.ahead * compute if prefetch else 0.0               # fetches posted this long before the forward
    layers, waits, waited = [], [], 0.0
    for j, layer in enumerate(m.engram_layers):
        need = t_block * layer + waited                          # embedding ~0, then blocks 0..layer-1
        if prefetch:
            work = push + tier.latency_s * (r["missing"] > 0) + (j + 1) * (miss_bytes / bw + cache_s)
            span = lead + need                                   # from the post to the layer
            ready = -lead + (work * stretch if work * stretch <= span else span + (work - span / stretch))
        else:
            ready = need + push * (j == 0) + one
        w = max(0.0, ready - need)
        waited += w
        layers.append({"layer": layer, "window_s": t_block * layer, "fetch_s": one, "ready_s": ready,
                       "exposed_s": w})
        waits.append(w)
    n_layers = len(m.engram_layers)
    # One batch's fetches a step on the link (the last layer's work: prefill pushes nothing): a
    # link slower than the step sets the pace.
    backlog = max(0.0, work * stretch - compute - sum(waits)) if lead else 0.0
    cpu = 0.0
    if hw.shares_cpu:
        cpu = n_layers * (tier.cpu_s(r["missing"]) + (hw.cache_tier.cpu_s(r["cached"]) if hw.cache_tier else 0.0))
        if wl.mode == "train":
            cpu += n_layers * tier.push_cpu_s(r["distinct"])
    exposed = sum(waits) + backlog
    step = compute + exposed + cpu
    return {"compute_s": compute, "block_s": t_block, "head_s": t_head, "rows": r, "layers": layers,
            "fetch_s": one, "push_s": push, "exposed_s": exposed, "backlog_s": backlog, "ahead_s": lead,
            "cpu_s": cpu, "step_s": step,
            "tokens_per_s": wl.tokens / step, "row_bytes_per_step": n_layers * miss_bytes}


def baseline(m: ModelShape, wl: Workload, hw: Hardware, dist=None) -> dict:
    """The reference: the rows in the worker itself (baseline_tier), read when each layer needs them."""
    base_hw = dataclasses.replace(hw, cache_tier=None)
    tl = timeline(m, wl.replace(cache_rows=0), base_hw, dist, tier=hw.baseline_tier, prefetch=False)
    if wl.mode == "train":   # in-process tables: the optimizer runs in the step, no push to wait for
        r = tl["rows"]
        tl["step_s"] = tl["step_s"] - tl["push_s"] + len(m.engram_layers) * r["distinct"] * hw.shard_update_s_per_row
    return tl


def memory_nodes(m: ModelShape, wl: Workload, hw: Hardware) -> dict:
    t = hw.rows_tier
    pooled = t.kind in ("remote", "cxl_pool", "disk")
    usable = t.capacity_bytes * hw.usable_fraction
    copies = wl.replicas if pooled else max(1, math.ceil(wl.workers / t.readers))
    if pooled:
        nodes = max(1, math.ceil(m.table_bytes * wl.replicas / usable))
        bytes_per_node = m.table_bytes * wl.replicas / nodes
    else:   # one copy per host (same-node / host DRAM): the table must fit in one host
        nodes = copies
        bytes_per_node = m.table_bytes
    return {"pooled": pooled, "copies": copies, "nodes": nodes, "shards": nodes * hw.shards_per_node,
            "bytes_per_node": bytes_per_node, "fits": bytes_per_node <= usable, "usable_bytes_per_node": usable,
            "stored_bytes": m.table_bytes * copies}


def plan(m: ModelShape, wl: Workload, hw: Hardware, prices: dict[str, float] | None = None) -> dict:
    """The whole plan as a JSON-serializable dict (format_plan prints it)."""
    dist = wl.distribution(m.table_rows) if wl.trace else None
    tl = timeline(m, wl, hw, dist)
    base = baseline(m, wl, hw, dist)
    sizing = memory_nodes(m, wl, hw)
    t = hw.rows_tier
    tps = wl.tokens_per_s or tl["tokens_per_s"]       # per worker
    batches_s = tps / wl.tokens
    miss_rows_s = batches_s * tl["rows"]["missing"] * len(m.engram_layers)  # per worker
    worker_gbps = miss_rows_s * max(m.row_bytes, t.min_read_bytes) / GB
    if wl.mode == "train":
        worker_gbps += batches_s * tl["rows"]["distinct"] * len(m.engram_layers) * m.grad_row_bytes / GB
    total_gbps = worker_gbps * wl.workers
    instances = sizing["nodes"] if sizing["pooled"] else max(1, math.ceil(wl.workers / t.readers))
    if t.kind == "cxl_pool":
        instances = max(1, math.ceil(wl.workers / t.readers))
    hs = hot_shares(m, wl, shards=sizing["shards"], nodes=sizing["nodes"], dist=dist)
    util = {
        "worker link": worker_gbps / t.per_reader_gbps(),
        f"{t.name} aggregate": total_gbps / (t.aggregate_gbps * instances),
    }
    if sizing["pooled"]:
        util["hot shard"] = total_gbps * hs["max_shard_share"] / hw.shard_gbps
        if sizing["nodes"] > 1:   # with one node, the hot node is the tier's aggregate
            util["hot node"] = total_gbps * hs["max_node_share"] / t.aggregate_gbps
    if hw.cache_tier is not None and wl.cache_rows:
        cache_gbps = batches_s * tl["rows"]["cached"] * len(m.engram_layers) * m.row_bytes / GB
        util["worker cache"] = cache_gbps / hw.cache_tier.link_gbps
    first = max(util, key=util.get)
    slow = max(1.0, util[first])
    distr = dist or Zipf(rows=max(1, m.table_rows // m.rows_per_token), s=wl.zipf_s)   # per hash head
    per_head = 1 if dist is not None else m.rows_per_token
    cache_for_target = {pol: per_head * distr.rows_for_hit_rate(wl.target_hit_rate, pol) for pol in ("lfu", "lru")}
    cost = {}
    prices = prices or {}
    for tier, stored in ((t, sizing["stored_bytes"]),
                         (hw.cache_tier, wl.cache_rows * m.row_bytes * len(m.engram_layers) * wl.workers)):
        if tier is None or not stored:
            continue
        price = prices.get(tier.name, tier.price_per_gb_month)
        if price is not None:
            cost[tier.name] = {"gb": stored / GB, "per_gb_month": price, "per_month": stored / GB * price}
    return {
        "model": m.to_dict(), "workload": dataclasses.asdict(wl), "device": dataclasses.asdict(hw.device),
        "rows_tier": t.to_dict(), "rows_tier_binds": hw.link_binds, "cache_tier": hw.cache_tier.to_dict() if hw.cache_tier else None,
        "id_distribution": distr.describe(),
        "sizing": sizing,
        "batch": {"tokens": wl.tokens, **{k: v for k, v in tl["rows"].items()}},
        "timeline": {k: tl[k] for k in ("compute_s", "block_s", "head_s", "fetch_s", "push_s", "exposed_s", "backlog_s",
                                        "ahead_s", "cpu_s", "step_s")} | {"layers": tl["layers"]},
        "baseline_step_s": base["step_s"],
        "exposed_wait_pct": 100 * tl["exposed_s"] / tl["step_s"],
        "penalty_pct": 100 * (1 - base["step_s"] / tl["step_s"]),
        "tokens_per_s_per_worker": tl["tokens_per_s"] / slow,
        "tokens_per_s_total": tl["tokens_per_s"] / slow * wl.workers,
        "bandwidth": {"per_worker_gbps": worker_gbps, "total_gbps": total_gbps, "instances": instances,
                      "utilization": util, "saturates_first": first, "throughput_factor": 1 / slow},
        "hot_shards": hs,
        "cache": {"rows_for_target": cache_for_target, "target_hit_rate": wl.target_hit_rate,
                  "bytes_for_target_lfu": cache_for_target["lfu"] * m.row_bytes * len(m.engram_layers)},
        "cost_per_month": cost,
    }
