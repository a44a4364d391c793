"""What `engram-mem status` shows: one row per shard, from the shards' Prometheus endpoints.

The numbers are the ones Prometheus scrapes (engram_mem/shard/metrics.py): each shard's endpoint is read
twice, `interval` seconds apart, for the rates; totals and latency quantiles come from the second
read. `--json` prints the same rows for scripts.

    rows = shard_rows(describe, endpoints, interval=1.0)   # endpoints: controller.metrics_endpoints()
    print(render(describe, rows))
    json.dump(prometheus_targets(describe, endpoints), open("targets.json", "w"))   # Prometheus file_sd
"""

from __future__ import annotations

import time

from engram_mem.shard.metrics import rates, scrape, summarize
from engram_mem.table import TableSpec


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _ms(v: float) -> str:
    return "-" if v != v else f"{v:.2f}"  # NaN: no calls yet


def _read(endpoints: dict) -> dict:
    out = {}
    for sid, addr in endpoints.items():
        try:
            out[sid] = summarize(scrape(addr)) if addr else {"error": "no metrics endpoint"}
        except OSError as e:
            out[sid] = {"error": f"cannot scrape {addr}: {e}"}
    return out


def shard_rows(describe: dict, endpoints: dict, interval: float = 1.0) -> list[dict]:
    """Per-shard numbers: identity, rows/bytes held, RSS, totals, rates over `interval`, latencies."""
    t0 = time.monotonic()
    before = _read(endpoints)
    time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    dt = time.monotonic() - t0
    after = _read(endpoints)
    rows = []
    for sid in sorted(describe["shards"]):
        s = describe["shards"][sid]
        row = {"shard": int(sid), "address": s["address"], "node_ip": s["node_ip"],
               "metrics_address": endpoints.get(sid, ""), "pid": s.get("pid", 0), "restarts": s.get("restarts", 0)}
        a, b = after.get(sid, {}), before.get(sid, {})
        if "error" in a or "error" in b:
            row["error"] = a.get("error") or b.get("error")
            rows.append(row)
            continue
        lat = a["latency"]
        row.update(
            rows_held=int(a.get("rows_held", 0)), table_bytes=int(a.get("table_bytes", 0)),
            optimizer_state_bytes=int(a.get("optimizer_state_bytes", 0)), rss_bytes=int(a.get("rss_bytes", 0)),
            ready=bool(a.get("ready", 0)), requests=sum(a["requests"].values()), errors=sum(a["errors"].values()),
            errors_by_code=a["errors_by_code"], rows_gathered=a["rows"].get("gathered", 0),
            rows_pushed=a["rows"].get("pushed", 0),
            gather_p50_ms=1e3 * lat.get("Gather", {}).get("p50_s", float("nan")),
            gather_p99_ms=1e3 * lat.get("Gather", {}).get("p99_s", float("nan")),
            push_p99_ms=1e3 * lat.get("Push", {}).get("p99_s", float("nan")),
            snapshot_age_s=a.get("snapshot_age_seconds", -1), log_bytes=a.get("log_bytes", -1),
            replica_lag_s=a.get("replica_lag_seconds", -1), **rates(b, a, dt))
        rows.append(row)
    return rows


def prometheus_targets(describe: dict, endpoints: dict) -> list[dict]:
    """Prometheus file_sd targets of the shards' endpoints (`engram-mem status --prometheus-sd`)."""
    return [{"targets": [addr], "labels": {"cluster": describe["name"], "engram_mem_shard": str(sid)}}
            for sid, addr in sorted(endpoints.items()) if addr]


def render(describe: dict, rows: list[dict]) -> str:
    d = describe
    nodes = sorted({m.get("node_ip", "") for s in d["shards"].values() for m in [s, *(s.get("replicas") or [])]} - {""})
    out = [f"memory cluster {d['name']!r} (id {d['cluster_id']}), epoch {d['epoch']}, "
           f"{len(d['shards'])} shards on {len(nodes)} node(s): {', '.join(nodes)}",
           f"{'shard':>5} {'address':<21} {'metrics':<21} {'rows':>13} {'table':>10} {'opt state':>10} {'rss':>10} "
           f"{'requests':>9} {'errors':>6} {'req/s':>7} {'MB/s out':>8} {'gather p50/p99 ms':>17} {'pid':>8} {'restarts':>8}"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['shard']:>5} {r['address']:<21} {r['metrics_address']:<21} {r['error']}")
            continue
        out.append(
            f"{r['shard']:>5} {r['address']:<21} {r['metrics_address']:<21} {r['rows_held']:>13,} "
            f"{fmt_bytes(r['table_bytes']):>10} {fmt_bytes(r['optimizer_state_bytes']):>10} "
            f"{fmt_bytes(r['rss_bytes']):>10} {r['requests']:>9,} {r['errors']:>6,} {r['requests_per_s']:>7.1f} "
            f"{r['gather_bytes_per_s'] / 1e6:>8.1f} {_ms(r['gather_p50_ms']):>8}/{_ms(r['gather_p99_ms']):<8} "
            f"{r.get('pid', 0):>8} {r['restarts']:>8}")
        if d["shards"].get(r["shard"], {}).get("huge_pages") == "never":
            out.append(f"{'':>5}   tables on 4 KiB pages (its tmpfs has huge=never): random-row gathers run "
                       f"1.5-1.8x faster on 2 MiB pages; mount it with huge=within_size (docs/operations.md)")
        restore = d["shards"].get(r["shard"], {}).get("restore") or {}
        if str(restore.get("source", "")).startswith("replica"):
            out.append(f"{'':>5}   restored from {restore['source']} (lsn {restore.get('lsn', '?')}): "
                       f"{restore.get('reason', '')}"
                       + ("" if restore.get("replica_ack") == "all" else
                          "; replica_ack=none: changes acknowledged within the replica's lag before the "
                          "failure may be missing"))
        followers = d["shards"].get(r["shard"], {}).get("replication") or {}
        ack_all = (d.get("config") or {}).get("replica_ack") == "all"
        for rep in d["shards"].get(r["shard"], {}).get("replicas") or []:
            lag = r.get("replica_lag_s", -1)
            in_sync = (followers.get(rep.get("actor", "")) or {}).get("in_sync", False)
            sync = (("in sync: acknowledges writes" if in_sync else "NOT in sync: writes are acknowledged without it")
                    if ack_all else ("following" if in_sync else "not following"))
            out.append(f"{'':>5}   replica {rep.get('member', '?')} at {rep.get('address', '-')} on node "
                       f"{rep.get('node_ip', '-')}: {'ready' if rep.get('ready') else 'not ready (copying)'}; "
                       f"{sync}; primary's replicas trail by {'-' if lag < 0 else f'{lag:.2f} s'}")
    for name, t in d["tables"].items():
        spec = t["spec"]
        out.append(f"table {name}: {spec['rows']:,} x {spec['dim']} {spec['dtype']}, "
                   f"{fmt_bytes(TableSpec.from_dict(spec).nbytes)}, "
                   f"optimizer {t['optimizer']['name']}")
        out += table_meta_lines(t.get("meta") or {})
    return "\n".join(out)


def table_meta_lines(meta: dict) -> list[str]:
    """An imported table's layout (layer, heads, bucket sizes and offsets) and identity, indented."""
    out = []
    lay = meta.get("layout")
    if lay:
        out.append(f"{'':>5} layer {lay['layer']}: n-gram orders {lay['orders'][0]}-{lay['orders'][-1]} x "
                   f"{lay['n_heads']} heads = {len(lay['bucket_sizes'])} prime buckets of {lay['head_dim']} values "
                   f"(block {lay['block']}), {lay['rows_past_buckets']:,} rows past the last")
        out.append(f"{'':>5}   bucket sizes   {' '.join(str(x) for x in lay['bucket_sizes'])}")
        out.append(f"{'':>5}   bucket offsets {' '.join(str(x) for x in lay['bucket_offsets'])}")
    ident = meta.get("identity")
    if ident:
        names = ", ".join(f"{x['name']} {x['dtype']} {list(x['shape'])}" for x in ident["tensors"])
        out.append(f"{'':>5} imported from {names}; digest "
                   + (ident["digest"] or f"incomplete ({ident['slots_digested']} slots digested)"))
    return out
