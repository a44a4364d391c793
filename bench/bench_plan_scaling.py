"""Scaling simulation plots: throughput and penalty vs shards and workers, TCP vs RDMA vs CXL pool.

    .venv/bin/python bench/bench_plan_scaling.py [--zipf 1.0]

Runs engram_mem.plan.simulate (analytic; see its docstring for why) for the V4.1-Flash and the
100B host-memory presets on H800 workers, rows on a TCP (100 Gb/s), RDMA (400 Gb/s) or CXL pool
tier, 64-1,024 shards (64 per memory node: 1-16 nodes; V4.1-Flash's 189 GiB fits in one) and 8-512 workers, prefill (8 x 1,024 tokens per batch)
and decode (batch 256 over a 4,096-token context). Marks on the curves name the resource that
binds (>= 70% busy: network, pool, hot shard, hot node). A third figure shows the busiest shard's
share of row reads under Zipf traffic against shard count, with 1/2/4 replicas and with a worker
cache of 0 / 16k / 256k rows per table. Writes bench/results/plan_scaling_{shards,workers,hot}.png,
appends bench/results/plan_scaling.jsonl, prints the tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, append_jsonl, print_table  # noqa: E402

SHARDS = [64, 128, 256, 512, 1024]
WORKERS = [8, 16, 32, 64, 128, 256, 512]
MARK = {"none": "o", "network": "s", "pool": "D", "hot shard": "X", "hot node": "^", "worker link": "v"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zipf", type=float, default=1.0)
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engram_mem.plan.planner import Hardware
    from engram_mem.plan.presets import DEVICE_PRESETS, MODEL_PRESETS
    from engram_mem.plan.simulate import hot_shares, sweep
    from engram_mem.plan.tiers import TIER_PRESETS
    from engram_mem.plan.workload import Workload

    t0 = time.time()
    dev = DEVICE_PRESETS["h800"]
    hws = {name: Hardware(device=dev, rows_tier=TIER_PRESETS[t], cache_tier=TIER_PRESETS["hbm"], shards_per_node=64)
           for name, t in (("TCP 100G", "tcp-100g"), ("RDMA 400G", "rdma-400g"), ("CXL pool", "cxl-pool"))}
    models = ["v4.1-flash", "engram-100b-host"]
    modes = {"prefill": Workload(mode="prefill", batch=8, seq_len=1024, zipf_s=args.zipf),
             "decode": Workload(mode="decode", batch=256, seq_len=1, context=4096, zipf_s=args.zipf)}
    colors = {"TCP 100G": "#cc3311", "RDMA 400G": "#0077bb", "CXL pool": "#009988"}
    records = []

    for axis, xs, fixed, fname in (("shards", SHARDS, {"workers": [64, 512]}, "plan_scaling_shards"),
                                   ("workers", WORKERS, {"shards": [64, 1024]}, "plan_scaling_workers")):
        fig, axes = plt.subplots(2, 4, figsize=(20, 8.5), sharex=True)
        for mi, mname in enumerate(models):
            for di, (mode, wl) in enumerate(modes.items()):
                ax_t, ax_p = axes[0, 2 * mi + di], axes[1, 2 * mi + di]
                for other in list(fixed.values())[0]:
                    for hname, hw in hws.items():
                        if axis == "shards":
                            pts = sweep(MODEL_PRESETS[mname], wl, {hname: hw}, shards=xs, workers=[other])
                        else:
                            pts = sweep(MODEL_PRESETS[mname], wl, {hname: hw}, shards=[other], workers=xs)
                        for q in pts:
                            records.append({"model": mname, "mode": mode, **{k: v for k, v in q.items() if k != "utilization"},
                                            "utilization": {k: round(v, 4) for k, v in q["utilization"].items()}})
                        style = "-" if other == list(fixed.values())[0][0] else "--"
                        lab = f"{hname}, {list(fixed)[0]}={other}"
                        ax_t.plot(xs, [q["tokens_per_s_total"] for q in pts], style, color=colors[hname], label=lab)
                        ax_p.plot(xs, [q["penalty_pct"] for q in pts], style, color=colors[hname], label=lab)
                        for x, q in zip(xs, pts):
                            ax_t.scatter([x], [q["tokens_per_s_total"]], marker=MARK.get(q["bottleneck"], "o"),
                                         color=colors[hname], s=40 if q["bottleneck"] != "none" else 10, zorder=3)
                            ax_p.scatter([x], [q["penalty_pct"]], marker=MARK.get(q["bottleneck"], "o"),
                                         color=colors[hname], s=40 if q["bottleneck"] != "none" else 10, zorder=3)
                ax_t.set_title(f"{mname}, {mode}", fontsize=10)
                for ax in (ax_t, ax_p):
                    ax.set_xscale("log", base=2)
                    ax.grid(alpha=0.3)
                ax_t.set_yscale("log")
                ax_p.set_xlabel(axis)
        axes[0, 0].set_ylabel("tokens/s, all workers")
        axes[1, 0].set_ylabel("throughput penalty % vs rows in HBM")
        handles = [plt.Line2D([], [], marker=m, ls="", color="k", label=f"binding: {k}") for k, m in MARK.items()]
        axes[0, 0].legend(fontsize=7, loc="lower right")
        axes[1, 0].legend(handles=handles, fontsize=7, loc="upper left")
        fig.suptitle(f"Engram rows from a memory cluster: H800 workers, Zipf s={args.zipf}, 64 shards per memory node "
                     f"(analytic model, engram_mem/plan/simulate.py)", fontsize=11)
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, f"{fname}.png"), dpi=100)
        plt.close(fig)

    # Hot shard: busiest shard's share of row reads vs shards; replicas and worker cache.
    m = MODEL_PRESETS["v4.1-flash"]
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    hot_rows = []
    shapes = {"prefill 8x1024": modes["prefill"],
              "decode batch 8": Workload(mode="decode", batch=8, seq_len=1, context=4096)}
    for ax, (shape, s) in zip(axes, [(sh, z) for sh in shapes for z in (1.0, 1.2)]):
        for reps, cache, style in ((1, 0, "-"), (2, 0, "-"), (4, 0, "-"), (1, 16_384, "--"), (1, 262_144, ":"),
                                   (2, 262_144, "-.")):
            wl = shapes[shape].replace(zipf_s=s, replicas=reps, cache_rows=cache)
            ratios = [hot_shares(m, wl, shards=n, nodes=max(1, n // 64))["max_shard_share"] * n for n in SHARDS]
            ax.plot(SHARDS, ratios, style, marker="o", label=f"replicas {reps}, cache {cache:,} rows/table")
            hot_rows += [{"shape": shape, "zipf": s, "replicas": reps, "cache_rows": cache, "shards": n,
                          "hot_vs_mean": round(r, 3)} for n, r in zip(SHARDS, ratios)]
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("shards")
        ax.set_ylabel("busiest shard load / mean shard load")
        ax.set_title(f"V4.1-Flash {shape}, Zipf s={s}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "plan_scaling_hot.png"), dpi=100)
    plt.close(fig)

    show = [r for r in records if r["shards"] in (64, 1024) and r["workers"] in (8, 64, 512)]
    print_table([{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items() if k in
                  ("model", "mode", "hardware", "shards", "workers", "tokens_per_s_total", "penalty_pct", "bottleneck")}
                 for r in show], ["model", "mode", "hardware", "shards", "workers", "tokens_per_s_total", "penalty_pct",
                                  "bottleneck"], title="scaling (selected points)")
    print_table([r for r in hot_rows if r["shards"] in (64, 1024)], ["shape", "zipf", "replicas", "cache_rows", "shards",
                                                                      "hot_vs_mean"], title="\nhot shard")
    path = append_jsonl("plan_scaling", {"bench": "plan_scaling", "args": vars(args), "results": records, "hot": hot_rows,
                                         "seconds": time.time() - t0})
    print(f"\nappended {path}; plots plan_scaling_shards.png, plan_scaling_workers.png, plan_scaling_hot.png "
          f"({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
