"""Prefill tokens/s with the Engram tables in the memory cluster vs in-process (a benchmark, not a test).

    .venv/bin/python bench/bench_prefill.py [--seqs 24] [--table-gb 2.2] [--repeats 3] [--threads 0]

A small dense backbone with ~2.2 GB of Engram tables (engram_model/configs/serving.json) prefills real
text (the stdlib's validation files) in sequences with lengths uniform in [100, 1024], the paper's
shape scaled to this machine. Same dense weights, same sequences, one run, configurations
interleaved per repeat:
  - in-process table                    (LocalRows: the whole table in the worker)
  - table in the cluster, shards on the worker's node (same-node shared-memory tier) / on another
    Ray node (rows over the TCP data plane; also a gRPC client beside it), each read through the
    node's fetch agent (the default) or with the read path in the model's process (prefetch on,
    and off); from the other node also "batch ahead": the next sequence's rows are fetched while
    this one computes (EngramModel.prefetch, as the engine does for its next prefill chunk)
Reports tokens/s (median over repeats) and the penalty against the in-process table.
Prints a table, appends bench/results/prefill.jsonl, draws bench/results/prefill.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_jsonl, bar_plot, markdown_table, print_table, set_threads, threads_arg  # noqa: E402
from model_setup import memory_on, model_config, start_two_nodes, text_windows  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=24)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--table-gb", type=float, default=2.2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-remote-node", action="store_true")
    threads_arg(p, 0, "the default uses both, so the data path takes turns with the model's threads")
    args = p.parse_args(argv)

    import torch

    set_threads(args.threads)

    from engram_model.cluster_rows import ClusterRows
    from engram_model.model import EngramModel
    from engram_model.rows import LocalRows, table_specs

    cfg, _, tok = model_config("serving", args.table_gb)
    specs = table_specs(cfg)
    table_bytes = sum(s.nbytes for s in specs.values())
    lengths = np.random.default_rng(1).integers(args.min_len, args.max_len + 1, args.seqs).tolist()
    seqs = [torch.from_numpy(w)[None] for w in text_windows(tok, lengths)]
    n_tokens = int(sum(lengths))
    print(f"Engram tables: {len(specs)} x {next(iter(specs.values())).rows:,} rows x {cfg.engram.head_dim} "
          f"= {table_bytes / 2**30:.2f} GiB; {args.seqs} sequences, {n_tokens:,} tokens "
          f"(lengths {min(lengths)}..{max(lengths)}); torch threads {torch.get_num_threads()}", flush=True)

    torch.manual_seed(0)
    t0 = time.time()
    local = LocalRows(specs, optimizer=None)
    model = EngramModel(cfg, rows=local, compress_lookup=tok.lookup).eval()
    print(f"in-process tables built in {time.time() - t0:.0f}s", flush=True)

    ray, cluster = start_two_nodes()
    try:
        sources = {"in-process table": local}
        ahead = set()   # sources whose next sequence's rows are fetched ahead
        clients = []
        for node in (("a", "b") if not args.skip_remote_node else ("a",)):
            t0 = time.time()
            mem = memory_on(node, f"prefill-{node}")
            clients.append(mem)
            where = "same node" if node == "a" else "other node, TCP data plane"
            # the read path in the node's fetch agent (the default) or in the model's own process
            sources[f"cluster ({where}), agent"] = ClusterRows(mem, specs, train=False)
            sources[f"cluster ({where}), in-process path"] = ClusterRows(mem, specs, train=False, create=False,
                                                                         agent=False)
            sources[f"cluster ({where}), in-process path, prefetch off"] = ClusterRows(
                mem, specs, train=False, prefetch=False, create=False, agent=False)
            if node == "b":  # a batch ahead, through the agent and in process
                sources[f"cluster ({where}), agent, batch ahead"] = ClusterRows(mem, specs, train=False, create=False)
                sources[f"cluster ({where}), in-process path, batch ahead"] = ClusterRows(
                    mem, specs, train=False, create=False, agent=False)
                ahead.update(list(sources)[-2:])
                # the gRPC path beside it: a second client of the same cluster
                import engram_mem

                g = engram_mem.connect(name=f"prefill-{node}", data_plane="grpc")
                clients.append(g)
                sources["cluster (other node, gRPC), in-process path"] = ClusterRows(g, specs, train=False, create=False,
                                                                                      agent=False)
            print(f"memory cluster on node {node}: tables created in {time.time() - t0:.0f}s", flush=True)

        def prefill(rows, early: bool = False) -> tuple[float, float]:
            model.rows = rows
            w0 = getattr(rows, "wait_s", 0.0)
            t = time.perf_counter()
            with torch.inference_mode():
                if early:
                    model.prefetch(seqs[0])
                for i, x in enumerate(seqs):
                    if early and i + 1 < len(seqs):
                        model.prefetch(seqs[i + 1])   # out while this one computes
                    model(x)
            return time.perf_counter() - t, getattr(rows, "wait_s", 0.0) - w0

        # Outputs agree exactly across sources (same rows, same arithmetic).
        with torch.inference_mode():
            ref = None
            for name, rows in sources.items():
                model.rows = rows
                out = model(seqs[0])[0]
                ref = out if ref is None else ref
                assert torch.equal(out, ref), f"{name} disagrees with the in-process table"
        times = {name: [] for name in sources}
        waits = {name: [] for name in sources}
        prefill(sources["in-process table"])  # warm-up
        for r in range(args.repeats):
            for name, rows in sources.items():
                dt, wait = prefill(rows, name in ahead)
                times[name].append(dt)
                waits[name].append(wait)
                print(f"  repeat {r + 1}: {name:<36} {n_tokens / dt:8.1f} tok/s  (exposed row wait {wait:.3f}s)",
                      flush=True)
        stats = {name: rows.stats() for name, rows in sources.items() if hasattr(rows, "stats")}
        for rows in sources.values():
            rows.close()
        for mem in clients:
            mem.close()
    finally:
        ray.shutdown()
        cluster.shutdown()

    base = n_tokens / float(np.median(times["in-process table"]))
    rows_out = []
    for name in sources:
        tps = n_tokens / float(np.median(times[name]))
        rows_out.append({"name": name, "tokens_per_s": round(tps, 1), "vs_in_process_pct": round(100 * (tps / base - 1), 2),
                         "median_s": round(float(np.median(times[name])), 3),
                         "exposed_wait_pct": round(100 * float(np.median(waits[name])) / float(np.median(times[name])), 2),
                         "node_local_rows": stats.get(name, {}).get("node_local_rows", 0),
                         "remote_rows": stats.get(name, {}).get("remote_rows", 0),
                         "prefetched_ahead": stats.get(name, {}).get("prefetched_ahead", 0)})
    cols = ["name", "tokens_per_s", "vs_in_process_pct", "exposed_wait_pct", "median_s", "node_local_rows", "remote_rows",
            "prefetched_ahead"]
    print_table(rows_out, cols, title=f"\nprefill, {n_tokens:,} tokens in {args.seqs} sequences, tables {table_bytes / 2**30:.2f} GiB, "
                                  f"torch threads {torch.get_num_threads()}")
    path = append_jsonl("prefill", {"bench": "prefill", "args": vars(args), "table_bytes": table_bytes,
                                    "tokens": n_tokens, "results": rows_out,
                                    "times": {k: v for k, v in times.items()}})
    png = bar_plot("prefill", [r["name"] for r in rows_out], [r["tokens_per_s"] for r in rows_out], "tokens/s",
                   f"prefill tokens/s, Engram tables {table_bytes / 2**30:.1f} GiB, lengths {args.min_len}-{args.max_len}")
    print(f"\nappended {path}\nplot {png}\n\n" + markdown_table(rows_out, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
