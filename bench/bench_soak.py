"""Soak: 8 concurrent clients gathering and pushing for 60 s against a 2-shard cluster on loopback.

    .venv/bin/python bench/bench_soak.py [--seconds 60] [--clients 8] [--rows 1000000] [--dim 64]
                                         [--gather-ids 4096] [--push-ids 512]

Each client is a Ray actor (its own process, num_cpus=0) with its own MemoryClient; it loops
gather (random ids) and push (random ids, adagrad) until the time is up and records every call's
latency and any error. The shards' numbers (requests, errors by code, RSS) come from their
Prometheus endpoints at the start and the end, so server-side errors are counted too.

Prints a table (requests, errors, throughput, p50/p99/p999 per RPC; RSS per shard at start and end),
appends a JSON line to bench/results/soak.jsonl and draws bench/results/soak.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_jsonl, bar_plot, markdown_table, print_table  # noqa: E402

NAME = "soak"


class SoakClient:
    """One client: gathers and pushes until `seconds` are up."""

    def run(self, seed: int, seconds: float, rows: int, dim: int, gather_ids: int, push_ids: int) -> dict:
        import engram_mem

        rng = np.random.default_rng(seed)
        out = {"Gather": [], "Push": [], "errors": [], "bytes": 0}
        with engram_mem.connect(name=NAME) as mem:
            end = time.monotonic() + seconds
            i = 0
            while time.monotonic() < end:
                try:
                    t0 = time.perf_counter()
                    got = mem.gather("t", rng.integers(0, rows, gather_ids))
                    out["Gather"].append(time.perf_counter() - t0)
                    out["bytes"] += got.nbytes
                    if i % 2 == 0:
                        ids = rng.integers(0, rows, push_ids)
                        t0 = time.perf_counter()
                        mem.push("t", ids, rng.standard_normal((push_ids, dim), dtype=np.float32) * 1e-3)
                        out["Push"].append(time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001 - counted, reported
                    out["errors"].append(f"{type(e).__name__}: {e}"[:300])
                i += 1
        return out


def _shard_numbers(ray, ctl) -> dict:
    from engram_mem.shard.metrics import scrape, summarize

    return {sid: summarize(scrape(addr)) for sid, addr in ray.get(ctl.metrics_endpoints.remote()).items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--gather-ids", type=int, default=4096)
    p.add_argument("--push-ids", type=int, default=512)
    args = p.parse_args(argv)

    import ray

    import engram_mem
    from engram_mem.control.local import init_embedded_ray

    init_embedded_ray(shards=2, num_cpus=args.clients + 4)
    load0 = os.getloadavg()
    try:
        with engram_mem.connect(shards=2, name=NAME) as mem:
            mem.create_table("t", rows=args.rows, dim=args.dim, seed=1, optimizer="adagrad")
            mem.gather("t", np.arange(0, args.rows, max(1, args.rows // 1000)))  # touch both shards
            start = _shard_numbers(ray, mem.controller)
            clients = [ray.remote(SoakClient).options(num_cpus=0).remote() for _ in range(args.clients)]
            t0 = time.time()
            results = ray.get([c.run.remote(i, args.seconds, args.rows, args.dim, args.gather_ids, args.push_ids)
                               for i, c in enumerate(clients)])
            wall = time.time() - t0
            end = _shard_numbers(ray, mem.controller)
            for c in clients:
                ray.kill(c)
    finally:
        load1 = os.getloadavg()
        ray.shutdown()

    rows = []
    for rpc in ("Gather", "Push"):
        lat = np.concatenate([np.asarray(r[rpc]) for r in results]) if results else np.zeros(0)
        served = sum(end[s]["requests"].get(rpc, 0) - start[s]["requests"].get(rpc, 0) for s in end)
        rows.append({"rpc": rpc, "client_calls": int(lat.size), "shard_requests": int(served),
                     "calls_per_s": lat.size / args.seconds,
                     "p50_ms": float(np.percentile(lat, 50) * 1e3) if lat.size else float("nan"),
                     "p99_ms": float(np.percentile(lat, 99) * 1e3) if lat.size else float("nan"),
                     "p999_ms": float(np.percentile(lat, 99.9) * 1e3) if lat.size else float("nan")})
    client_errors = [e for r in results for e in r["errors"]]
    shard_errors = {s: sum(end[s]["errors"].values()) - sum(start[s]["errors"].values()) for s in end}
    gathered = sum(r["bytes"] for r in results)
    rss = [{"shard": s, "rss_start_mb": start[s]["rss_bytes"] / 2**20, "rss_end_mb": end[s]["rss_bytes"] / 2**20,
            "table_mb": end[s]["table_bytes"] / 2**20, "opt_state_mb": end[s]["optimizer_state_bytes"] / 2**20}
           for s in sorted(end)]
    # Bound: RSS may grow by the optimizer state first allocated during the soak plus 10% and 128 MB.
    bound_ok = all(r["rss_end_mb"] <= (r["rss_start_mb"] + r["opt_state_mb"]) * 1.1 + 128 for r in rss)
    title = (f"soak: {args.clients} clients x {args.seconds:.0f} s, 2 shards, {args.rows:,} x {args.dim} fp32, "
             f"gather {args.gather_ids} ids, push {args.push_ids} ids; wall {wall:.1f} s; "
             f"load avg {load0[0]:.1f} -> {load1[0]:.1f}")
    print_table(rows, ["rpc", "client_calls", "shard_requests", "calls_per_s", "p50_ms", "p99_ms", "p999_ms"], title)
    print_table(rss, ["shard", "rss_start_mb", "rss_end_mb", "table_mb", "opt_state_mb"],
                f"shard RSS (bound: end <= (start + optimizer state) x 1.1 + 128 MB): {'ok' if bound_ok else 'EXCEEDED'}")
    print(f"errors: clients {len(client_errors)}, shards {sum(shard_errors.values())} {shard_errors}; "
          f"gathered {gathered / 1e9:.2f} GB ({gathered / args.seconds / 1e6:.1f} MB/s)")
    for e in client_errors[:5]:
        print("  ", e)
    print(markdown_table(rows, ["rpc", "client_calls", "calls_per_s", "p50_ms", "p99_ms", "p999_ms"]))
    print(markdown_table(rss, ["shard", "rss_start_mb", "rss_end_mb", "table_mb", "opt_state_mb"]))
    append_jsonl("soak", {"args": vars(args), "rpcs": rows, "rss": rss, "client_errors": len(client_errors),
                          "shard_errors": shard_errors, "gathered_bytes": gathered, "wall_s": wall,
                          "rss_bound_ok": bound_ok, "loadavg_start": load0, "loadavg_end": load1})
    labels = [f"{r['rpc']} {q}" for r in rows for q in ("p50", "p99", "p999")]
    values = [r[f"{q}_ms"] for r in rows for q in ("p50", "p99", "p999")]
    print(bar_plot("soak", labels, values, "ms", f"soak: {args.clients} clients x {args.seconds:.0f} s, 2 shards, "
                                                 f"errors {len(client_errors)}, load avg {load1[0]:.1f}"))


if __name__ == "__main__":
    main()
