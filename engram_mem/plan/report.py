"""Render a plan (planner.plan's dict) as the text table `engram-mem plan` prints."""

from __future__ import annotations

GiB = 2**30


def text_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def format_plan(p: dict) -> str:
    m, wl, sz, tl, bw = p["model"], p["workload"], p["sizing"], p["timeline"], p["bandwidth"]
    t = p["rows_tier"]
    lines = [
        f"plan: {m['name']} ({len(m['engram_layers'])} Engram layers at {list(m['engram_layers'])}, "
        f"{m['table_rows']:,} rows x {m['row_bytes']} B each = {len(m['engram_layers']) * m['table_rows'] * m['row_bytes'] / GiB:,.1f} GiB)",
        f"  workload: {wl['mode']}, {wl['workers']} workers x batch {wl['batch']} x {wl['seq_len']} tokens "
        f"(context {wl['context'] or wl['seq_len']}), prefetch {'on' if wl['prefetch'] else 'off'}"
        + (f", fetched {wl['ahead']} batch{'es' if wl['ahead'] > 1 else ''} ahead" if wl.get("ahead") else "")
        + f", {p['id_distribution']}",
        f"  hardware: {p['device']['name']}; rows on {t['name']} ({'measured here' if t['measured'] else 'published'}: "
        f"{t['latency_s'] * 1e6:.1f} us, {t['link_gbps']:g} GB/s/link, {t['aggregate_gbps']:g} GB/s aggregate"
        + (f", whole {t['min_read_bytes']} B pages per row read)" if t["min_read_bytes"] else ")")
        + (f"; cache on {p['cache_tier']['name']}, {wl['cache_rows']:,} rows/table" if p["cache_tier"] else ""),
        f"  a client's link to the rows: {p.get('rows_tier_binds', 'line rate')}",
        "",
        "memory nodes",
        f"  {'pooled' if sz['pooled'] else 'one copy per host'}: {sz['copies']} table cop{'y' if sz['copies'] == 1 else 'ies'}, "
        f"{sz['nodes']} node(s), {sz['shards']} shards, {sz['bytes_per_node'] / GiB:,.1f} GiB per node "
        f"(usable {sz['usable_bytes_per_node'] / GiB:,.0f} GiB){'' if sz['fits'] else '  DOES NOT FIT'}",
        "",
        "one batch on one worker",
        f"  {p['batch']['tokens']:,} tokens -> {p['batch']['lookups']:,.0f} row lookups/layer, "
        f"{p['batch']['distinct']:,.0f} distinct, {p['batch']['missing']:,.0f} from {t['name']} "
        f"(cache hit rate per lookup {100 * p['batch']['lookup_hit_rate']:.1f}%)",
        f"  compute {_ms(tl['compute_s'])} (block {_ms(tl['block_s'])}); one layer's fetch {_ms(tl['fetch_s'])}"
        + (f"; gradient push {_ms(tl['push_s'])}" if tl["push_s"] else ""),
    ]
    if tl.get("ahead_s"):
        lines.append(f"  fetches go out {_ms(tl['ahead_s'])} before the forward (the batches ahead's compute); "
                     "times below from the forward's start" + (f"; the link's backlog adds {_ms(tl['backlog_s'])} a step"
                                                               if tl["backlog_s"] else ""))
    rows = [{"Engram layer": l["layer"], "prefetch window": _ms(l["window_s"] + tl.get("ahead_s", 0.0)), "rows ready at": _ms(l["ready_s"]),
             "exposed wait": _ms(l["exposed_s"])} for l in tl["layers"]]
    lines += ["  " + s for s in text_table(rows, list(rows[0])).split("\n")]
    lines += [
        f"  step {_ms(tl['step_s'])} = compute + exposed wait {_ms(tl['exposed_s'])} + read-path CPU {_ms(tl['cpu_s'])}; "
        f"baseline (rows in the worker) {_ms(p['baseline_step_s'])}",
        f"  exposed wait {p['exposed_wait_pct']:.2f}% of the step; predicted throughput penalty {p['penalty_pct']:.2f}%",
        f"  {p['tokens_per_s_per_worker']:,.0f} tokens/s per worker, {p['tokens_per_s_total']:,.0f} in all",
        "",
        "bandwidth",
        f"  per worker {bw['per_worker_gbps']:.3f} GB/s; all workers {bw['total_gbps']:.2f} GB/s over {bw['instances']} instance(s)",
    ]
    util = [{"resource": k, "utilization %": round(100 * v, 2)} for k, v in sorted(bw["utilization"].items(), key=lambda x: -x[1])]
    lines += ["  " + s for s in text_table(util, ["resource", "utilization %"]).split("\n")]
    lines.append(f"  saturates first: {bw['saturates_first']}" +
                 (f" -> throughput x{bw['throughput_factor']:.2f}" if bw["throughput_factor"] < 1 else " (headroom)"))
    hs = p["hot_shards"]
    lines.append(f"  hottest shard serves {100 * hs['max_shard_share']:.2f}% of row reads (mean {100 * hs['mean_shard_share']:.2f}%), "
                 f"hottest node {100 * hs['max_node_share']:.2f}%")
    c = p["cache"]
    lines += ["", "cache for a {:.0f}% hit rate: {:,.0f} rows/table (ideal LFU, ~TinyLFU), {:,.0f} rows (LRU); "
              "{:,.2f} GiB per worker (LFU)".format(100 * c["target_hit_rate"], c["rows_for_target"]["lfu"],
                                                     c["rows_for_target"]["lru"], c["bytes_for_target_lfu"] / GiB)]
    if p["cost_per_month"]:
        lines += ["", "cost per month"]
        lines += [f"  {k}: {v['gb']:,.0f} GB x ${v['per_gb_month']:g}/GB = ${v['per_month']:,.0f}"
                  for k, v in p["cost_per_month"].items()]
    return "\n".join(lines)
