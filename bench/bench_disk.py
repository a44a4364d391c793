"""A disk-backed shard against a DRAM one: gather rows/s cold and warm (a benchmark, not a test).

    .venv/bin/python bench/bench_disk.py [--table-mb 1024] [--batch 16384] [--calls 12] [--dir /var/tmp]

For rows of 264 B (FP8 + scales, V4.1-Flash) and 1 KiB (256 x fp32), one table of about
`table-mb` each, held by a ShardStore (shard.py, the code a shard actor runs) either in /dev/shm
(DRAM) or in a file under --dir (storage.py, `engram-mem up --storage disk:DIR`). Ids are
Zipf(1.1)-distributed ranks scattered over the table by a multiplicative hash, as n-gram traffic
is. Per configuration, rows/s and GB/s (p50) of ShardStore.gather for batches of `batch` ids:
  - DRAM: the table in /dev/shm
  - disk, warm: after --warm-batches batches of other ids from the same law (page cache holds the
    rows read so far; no budget). The timed batches are new draws: their rare ids still miss.
  - disk, warm, budget 1/4 of the table: the page budget trims the hot set
  - disk, cold: every call after dropping the file from the page cache (madvise + posix_fadvise DONTNEED)
and what fraction of DRAM speed each reaches. Each result also records the distinct ids per batch
(median), the quartiles of the call times and, cold, how long the drop took (it is inside the timed
call): bench/bench_plan_validate.py compares the cold rows with the planner's here-disk tier.
Prints a table, appends bench/results/disk.jsonl, draws bench/results/disk.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_jsonl, bar_plot, markdown_table, print_table, time_calls  # noqa: E402


def zipf_ids(rng, n: int, rows: int, a: float = 1.1) -> np.ndarray:
    ranks = rng.zipf(a, n).astype(np.uint64)
    return ((ranks * np.uint64(0x9E3779B97F4A7C15)) % np.uint64(rows)).astype(np.int64)


def drop(store, name: str) -> None:
    """Cold start: unmap the shard's pages and drop the file from the page cache."""
    budget = store.budgets[name]
    budget.counts[:] = 0               # keep nothing: the whole file leaves the mapping and the page cache
    budget.trim(store.tables[name].buffer)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table-mb", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--calls", type=int, default=12)
    p.add_argument("--warm-batches", type=int, default=40, help="batches of traffic before a warm measurement")
    p.add_argument("--dir", default="/var/tmp")
    args = p.parse_args(argv)

    from engram_mem.storage.store import ShardStore
    from engram_mem.storage.disk import resident_bytes
    from engram_mem.table import TableSpec

    rng = np.random.default_rng(0)
    work = os.path.join(args.dir, f"engram-bench-disk-{os.getpid()}")
    shm = f"/dev/shm/engram-bench-disk-{os.getpid()}"
    results = []
    try:
        for label, dtype, dim, block in (("264 B (fp8+scales)", "fp8_e4m3", 256, 32), ("1 KiB (fp32)", "float32", 256, 0)):
            row_bytes = TableSpec("x", 1, dim, dtype=dtype, block=block).row_bytes
            rows = (args.table_mb << 20) // row_bytes
            spec = TableSpec("t", rows, dim, dtype=dtype, block=block, init_std=0.0 if block else 1.0)
            batches = [zipf_ids(rng, args.batch, rows) for _ in range(args.calls + 3)]
            warm_up = [zipf_ids(rng, args.batch, rows) for _ in range(args.warm_batches)]  # other draws, same law
            nbytes = args.batch * row_bytes
            data = None
            configs = [("DRAM (/dev/shm)", "shm", 0, False), ("disk, warm", f"disk:{work}", 0, False),
                       ("disk, warm, budget 1/4 table", f"disk:{work}", spec.nbytes // 4, False),
                       ("disk, cold", f"disk:{work}", 0, True)]
            for cname, storage, budget, cold in configs:
                store = ShardStore(0, shm_dir=shm, storage=storage, memory_budget=budget)
                store.add_table(spec, range(spec.n_slots))
                if data is None:  # one table of random bytes, imported into every configuration
                    data = np.random.default_rng(1).integers(0, 120, (rows, row_bytes), dtype=np.uint8)
                    data = data.view(spec.storage_dtype)
                step = max(1, (64 << 20) // row_bytes)
                for a in range(0, rows, step):
                    store.import_rows("t", a, data[a:a + step])
                if storage != "shm":
                    store.budgets["t"].trim(store.tables["t"].buffer)  # write back, start from an empty cache
                assert np.array_equal(store.gather("t", batches[0][:64]), data[batches[0][:64]])
                drops = []
                if cold:
                    def fn(ids, s=store):
                        t0 = time.perf_counter()
                        drop(s, "t")
                        drops.append(time.perf_counter() - t0)
                        return s.gather("t", ids)
                    t = time_calls(f"{label} {cname}", fn, batches, warmup=1, nbytes=nbytes)
                else:
                    for ids in warm_up:  # warm: earlier traffic of the same law (not the timed ids)
                        store.gather("t", ids)
                    t = time_calls(f"{label} {cname}", lambda ids, s=store: s.gather("t", ids), batches, nbytes=nbytes)
                path = store.tables["t"].buffer.path
                res = resident_bytes(path) if path and storage != "shm" else spec.nbytes
                q25, q75 = np.percentile(t.seconds, [25, 75]) * 1e3
                distinct = int(np.median([np.unique(b).size for b in batches[len(batches) - len(t.seconds):]]))
                results.append(dict(t.row(), rows_label=label, config=cname, table_mb=spec.nbytes >> 20,
                                    mrows_per_s=round(args.batch / t.p50 / 1e6, 3), resident_mb=res >> 20,
                                    row_bytes=row_bytes, distinct_rows=distinct, p25_ms=round(q25, 3),
                                    p75_ms=round(q75, 3), drop_ms=round(float(np.median(drops)) * 1e3, 3)
                                    if drops else None))
                store.close()
            del data
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)

    for r in results:
        dram = next(x for x in results if x["rows_label"] == r["rows_label"] and x["config"].startswith("DRAM"))
        r["x_dram"] = round(r["mrows_per_s"] / dram["mrows_per_s"], 3)
    cols = ["rows_label", "config", "mrows_per_s", "gbps", "x_dram", "p50_ms", "p99_ms", "distinct_rows", "drop_ms",
            "resident_mb", "table_mb"]
    print_table(results, cols, title=f"\nShardStore.gather of {args.batch:,} Zipf ids (p50; disk dir {args.dir}; "
                                     f"load avg {os.getloadavg()[0]:.1f})")
    path = append_jsonl("disk", {"bench": "disk", "args": vars(args), "results": results, "loadavg": os.getloadavg()})
    png = bar_plot("disk", [f"{r['rows_label']}\n{r['config']}" for r in results], [r["mrows_per_s"] for r in results],
                   "M rows/s (p50)", f"disk-backed vs DRAM shard, {args.batch:,} Zipf ids a call")
    print(f"\nappended {path}\nplot {png}\n\n" + markdown_table(results, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
