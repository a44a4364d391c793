"""fp32, bf16 and FP8+scales rows of the same table, side by side over every tier (a benchmark, not a test).

    .venv/bin/python bench/bench_row_formats.py [--rows 500000] [--dim 256] [--batch 65536] [--calls 15]

Three tables of the same rows x dim (float32: 1,024 B a row at dim 256; bfloat16: 512 B; fp8_e4m3
with a ue8m0 scale per 32 values: 264 B) in a one-shard memory cluster on this node. For random
batches of distinct ids it measures rows/s and GB/s (p50) of:
  - in-process gather (np.take from the worker's own array of stored rows)
  - in-process gather + the float32 rows the model needs (bf16 cast / fp8 dequantize, on the CPU here)
  - the same-node tier (NodeLocalTier.read of the shard's shared memory)
  - the hot-row cache, all hits (RowCache.lookup)
  - the shard over gRPC on loopback (MemoryClient.gather_distinct_async)
GB/s counts stored bytes moved (what the tier carries), so rows/s is the figure to compare across formats.
Prints a table, appends bench/results/row_formats.jsonl, draws bench/results/row_formats.png.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_jsonl, markdown_table, print_table, time_calls  # noqa: E402

FORMATS = (("fp32", "float32", 0), ("bf16", "bfloat16", 0), ("fp8+scales", "fp8_e4m3", 32))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--calls", type=int, default=15)
    args = p.parse_args(argv)

    import engram_mem
    from engram_mem.worker.cache import RowCache
    from engram_mem.worker.nodelocal import NodeLocalTier
    from engram_mem.table import rows_to_float
    from engram_mem.table import TableSpec

    rng = np.random.default_rng(0)
    batches = [np.sort(rng.choice(args.rows, args.batch, replace=False)) for _ in range(args.calls + 3)]
    results = []
    with engram_mem.connect(shards=1, name="bench-formats") as mem:
        tier = NodeLocalTier(mem)
        for label, dtype, block in FORMATS:
            spec = TableSpec(f"t.{dtype}", args.rows, args.dim, dtype=dtype, seed=1, block=block)
            mem.create_table_spec(spec)
            table = spec.init_range(0, args.rows)                       # the worker's own copy [R, storage_dim]
            nbytes = args.batch * spec.row_bytes
            assert tier.local_ranks() == [0], "the shard should be on this node"
            assert np.array_equal(tier.read(spec.name, 0, batches[0][:100]), table[batches[0][:100]])
            runs = [
                ("in-process gather", lambda ids: np.take(table, ids, axis=0), batches),
                ("in-process gather + to float32", lambda ids: rows_to_float(np.take(table, ids, axis=0), spec), batches),
                ("same-node tier", lambda ids: tier.read(spec.name, 0, ids), batches),
            ]
            cache = RowCache(nbytes * 2, spec.storage_dim, spec.storage_dtype)
            cache.record(batches[0])
            cache.admit(batches[0], table[batches[0]])
            assert cache.lookup(batches[0])[0].all(), "the cache should hold the whole batch"
            runs.append(("hot-row cache (all hits)", lambda ids: cache.lookup(ids), [batches[0]] * len(batches)))
            runs.append(("gRPC (loopback)", lambda ids: mem.gather_distinct_async(spec.name, ids).result(), batches))
            for tier_name, fn, inputs in runs:
                t = time_calls(f"{label} {tier_name}", fn, inputs, nbytes=nbytes)
                results.append(dict(t.row(), format=label, tier=tier_name, row_bytes=spec.row_bytes,
                                    mrows_per_s=round(args.batch / t.p50 / 1e6, 3)))
            del table, cache
            mem.drop_table(spec.name)
        tier.close()

    fp32 = {r["tier"]: r["mrows_per_s"] for r in results if r["format"] == "fp32"}
    for r in results:
        r["rows_x_fp32"] = round(r["mrows_per_s"] / fp32[r["tier"]], 3)
    cols = ["format", "tier", "row_bytes", "mrows_per_s", "rows_x_fp32", "gbps", "p50_ms", "p99_ms"]
    print_table(results, cols, title=f"\n{args.batch:,} distinct random rows of {args.rows:,} x {args.dim} "
                                     f"(M rows/s and stored GB/s at p50; load avg {os.getloadavg()[0]:.1f})")
    path = append_jsonl("row_formats", {"bench": "row_formats", "args": vars(args), "results": results,
                                        "loadavg": os.getloadavg()})
    png = _plot(results)
    print(f"\nappended {path}\nplot {png}\n\n" + markdown_table(results, cols))
    return 0


def _plot(results: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import RESULTS

    tiers = list(dict.fromkeys(r["tier"] for r in results))
    fmts = list(dict.fromkeys(r["format"] for r in results))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    w = 0.8 / len(fmts)
    for i, f in enumerate(fmts):
        vals = [next(r["mrows_per_s"] for r in results if r["format"] == f and r["tier"] == t) for t in tiers]
        bars = ax.bar(np.arange(len(tiers)) + i * w, vals, w, label=f)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(np.arange(len(tiers)) + w, tiers, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("M rows/s (p50)")
    ax.set_title("the same table as fp32, bf16 and FP8+scales rows, per tier", fontsize=10)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(RESULTS, "row_formats.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
