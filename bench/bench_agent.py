"""The per-node fetch agent: what the hand-off costs, and what one cache per node buys.

    .venv/bin/python bench/bench_agent.py [--repeats 200] [--table-rows 1000000] [--cache-mb 16]

1. Hand-off: a fetch of 1k and of 64k ids (Zipf, duplicates inside) from shards on this node
   (the same-node tier serves every row), through the node's agent vs with the read path in this
   process (RowFetcher): wall time from posting the ids to rows readable, p50 / p99, and the CPU
   time this process spent per fetch (time.process_time: every thread of the worker's process;
   through the agent the rest is the agent's). The two paths take turns call by call.
2. One cache per node: 2 and 4 workers reading the same Zipf traffic (each its own seed) of rows
   of remote shards, with one cache per worker of C/k bytes (today's in-process path) vs one
   cache of C bytes in the node's agent shared by all k: hit rate and rows fetched over the
   network. Traffic counts, not time: the workers take turns batch by batch.

Prints a table, appends bench/results/agent.jsonl, draws bench/results/agent.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_jsonl, bar_plot, markdown_table, print_table  # noqa: E402


def zipf_ids(rng, n: int, rows: int, a: float = 1.1) -> np.ndarray:
    ranks = rng.zipf(a, n) - 1
    return (ranks % rows * 2654435761 % rows).astype(np.int64)  # hot ids spread over the slots


def handoff(mem, table: str, rows: int, repeats: int) -> list[dict]:
    from engram_mem.agent import AgentReader
    from engram_mem.worker.fetcher import RowFetcher

    reader, fetcher = AgentReader(mem), RowFetcher(mem)
    out = []
    try:
        for n in (1024, 65536):
            rng = np.random.default_rng(n)
            batches = [zipf_ids(rng, n, rows) for _ in range(repeats + 5)]
            wall = {"agent": [], "in-process path": []}
            cpu = {"agent": [], "in-process path": []}
            for i, ids in enumerate(batches):
                for path in ("agent", "in-process path"):
                    c0, t0 = time.process_time(), time.perf_counter()
                    if path == "agent":
                        fut = reader.fetch_async(table, ids)
                        fut.result()
                        fut.release()
                    else:
                        fetcher.fetch_async(table, ids).result()
                    t1, c1 = time.perf_counter(), time.process_time()
                    if i >= 5:
                        wall[path].append(t1 - t0)
                        cpu[path].append(c1 - c0)
            for path in wall:
                w = np.array(wall[path]) * 1e3
                out.append({"part": "hand-off", "name": f"{n} ids, {path}", "p50_ms": round(float(np.median(w)), 3),
                            "p99_ms": round(float(np.percentile(w, 99)), 3),
                            "worker_cpu_ms": round(1e3 * float(np.median(cpu[path])), 3)})
                print(f"  {out[-1]}", flush=True)
    finally:
        reader.close()
        fetcher.close()
    return out


def shared_cache(mem, rows: int, dim: int, cache_bytes: int, batches: int, batch: int) -> list[dict]:
    from engram_mem.agent import AgentReader
    from engram_mem.worker.fetcher import RowFetcher

    out = []
    for k in (2, 4):
        for mode in ("one cache per worker", "one cache per node (agent)"):
            table = f"zipf-{k}-{'node' if 'node' in mode else 'worker'}"
            mem.create_table(table, rows=rows, dim=dim, exist_ok=True)
            if mode == "one cache per worker":
                workers = [RowFetcher(mem, cache_bytes={table: cache_bytes // k}, node_local=False) for _ in range(k)]
            else:
                workers = [AgentReader(mem, cache_bytes={table: cache_bytes}, node_local=False) for _ in range(k)]
            rngs = [np.random.default_rng(100 + w) for w in range(k)]
            try:
                s0 = workers[0].summary() if "node" in mode else None
                for b in range(batches):
                    for w, rng in zip(workers, rngs):
                        w.fetch(table, zipf_ids(rng, batch, rows))
                if "node" in mode:
                    s1 = workers[0].summary()
                    lookups = s1["node_cache_lookups"] - s0["node_cache_lookups"]  # every worker's: the node's cache
                    hits = s1["node_cache_hits"] - s0["node_cache_hits"]
                    remote = s1["node_remote_rows"] - s0["node_remote_rows"]
                    nbytes = s1["node_cache_bytes_by_table"].get(table, 0)
                else:
                    ss = [w.summary() for w in workers]
                    lookups, hits = sum(s["cache_lookups"] for s in ss), sum(s["cache_hits"] for s in ss)
                    remote, nbytes = sum(s["remote_rows"] for s in ss), sum(s["cache_bytes"] for s in ss)
            finally:
                for w in workers:
                    w.close()
                mem.drop_table(table)
            out.append({"part": "cache", "name": f"{k} workers, {mode}", "hit_rate": round(hits / lookups, 4),
                        "remote_rows": int(remote), "cache_mib": round(nbytes / 2**20, 1)})
            print(f"  {out[-1]}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--table-rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--cache-mb", type=int, default=16, help="total cache bytes of the node's workers")
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--batch", type=int, default=4096)
    args = p.parse_args(argv)

    import ray

    import engram_mem
    from engram_mem.control.local import init_embedded_ray

    init_embedded_ray(num_cpus=8, object_store_bytes=512 << 20)
    try:
        with engram_mem.connect(shards=2, name="bench-agent") as mem:
            mem.create_table("handoff", rows=args.table_rows, dim=args.dim)
            results = handoff(mem, "handoff", args.table_rows, args.repeats)
            results += shared_cache(mem, args.table_rows, args.dim, args.cache_mb << 20, args.batches, args.batch)
    finally:
        ray.shutdown()

    cols = ["part", "name", "p50_ms", "p99_ms", "worker_cpu_ms", "hit_rate", "remote_rows", "cache_mib"]
    table = [{c: r.get(c, "") for c in cols} for r in results]
    print_table(table, cols, title=f"\nthe fetch agent: hand-off ({args.repeats} fetches each, shards on this node) "
                                   f"and one cache per node ({args.batches} x {args.batch}-id Zipf batches per worker)")
    path = append_jsonl("agent", {"bench": "agent", "args": vars(args), "results": results})
    cache_rows = [r for r in results if r["part"] == "cache"]
    png = bar_plot("agent", [r["name"] for r in cache_rows], [r["hit_rate"] for r in cache_rows], "cache hit rate",
                   "same total cache bytes: one cache per worker vs one per node")
    print(f"\nappended {path}\nplot {png}\n\n" + markdown_table(table, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
