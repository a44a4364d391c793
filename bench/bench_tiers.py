"""The worker's read tiers side by side (a benchmark, not a test).

    .venv/bin/python bench/bench_tiers.py [--rows 1000000] [--dim 256] [--batch 65536] [--calls 20]

One 1M x 256 fp32 table in a one-shard memory cluster on this node. For random 64k-row batches it
measures GB/s (p50) of:
  - in-process gather (np.take from the worker's own array): the physical limit
  - the same-node tier: the shard's shared-memory file mapped by the worker (NodeLocalTier.read)
  - the same-node tier through RowFetcher (adds de-duplication and the fetcher thread)
  - the hot-row cache, all hits (RowCache.lookup)
  - the shard over gRPC on loopback (MemoryClient.gather_distinct_async)
and reports the same-node tier's GB/s divided by in-process gather (the issue's aim: >= 0.8).
Prints a table, appends bench/results/tiers.jsonl, draws bench/results/tiers.png.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_jsonl, bar_plot, markdown_table, print_table, time_calls  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args(argv)

    import engram_mem
    from engram_mem.worker.cache import RowCache
    from engram_mem.worker.fetcher import RowFetcher
    from engram_mem.worker.nodelocal import NodeLocalTier
    from engram_mem.table import TableSpec

    rng = np.random.default_rng(0)
    # Distinct ids per batch, so every tier moves exactly batch x dim x 4 bytes.
    batches = [np.sort(rng.choice(args.rows, args.batch, replace=False)) for _ in range(args.calls + 3)]
    nbytes = args.batch * args.dim * 4
    spec = TableSpec("t", args.rows, args.dim, seed=1)
    table = spec.init_range(0, args.rows)
    results = [time_calls("in-process gather", lambda ids: np.take(table, ids, axis=0), batches, nbytes=nbytes)]

    with engram_mem.connect(shards=1, name="bench-tiers") as mem:
        mem.create_table_spec(spec)
        tier = NodeLocalTier(mem)
        assert tier.local_ranks() == [0], "the shard should be on this node"
        assert np.array_equal(tier.read("t", 0, batches[0][:100]), table[batches[0][:100]])
        results.append(time_calls("same-node tier (shared memory)", lambda ids: tier.read("t", 0, ids), batches,
                                  nbytes=nbytes))
        fetcher = RowFetcher(mem, node_local=True)
        results.append(time_calls("same-node tier via RowFetcher", lambda ids: fetcher.fetch("t", ids), batches,
                                  nbytes=nbytes))
        cache = RowCache(nbytes * 2, args.dim, np.float32)
        cache.record(batches[0])
        cache.admit(batches[0], table[batches[0]])
        assert cache.lookup(batches[0])[0].all(), "the cache should hold the whole batch"
        hot = [batches[0]] * len(batches)
        results.append(time_calls("hot-row cache (all hits)", lambda ids: cache.lookup(ids), hot, nbytes=nbytes))
        results.append(time_calls("shard over gRPC (loopback)",
                                  lambda ids: mem.gather_distinct_async("t", ids).result(), batches, nbytes=nbytes))
        fetcher.close()
        del table

    base = results[0].gbps
    rows = [dict(r.row(), x_in_process=round(r.gbps / base, 3)) for r in results]
    cols = ["name", "gbps", "x_in_process", "p50_ms", "p99_ms"]
    print_table(rows, cols, title=f"\nread {args.batch:,} distinct random rows x {args.dim} fp32 (GB/s at p50)")
    ratio = results[1].gbps / base
    print(f"same-node tier / in-process gather: {ratio:.2f}")
    path = append_jsonl("tiers", {"bench": "tiers", "args": vars(args), "results": rows,
                                  "same_node_vs_in_process": ratio})
    png = bar_plot("tiers", [r.name for r in results], [r.gbps for r in results], "GB/s (p50)",
                   f"worker read tiers: {args.batch:,} rows x {args.dim} fp32")
    print(f"\nappended {path}\nplot {png}\n\n" + markdown_table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
