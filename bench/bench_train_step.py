"""Training step time with the Engram tables in the memory cluster vs in-process (a benchmark, not a test).

    .venv/bin/python bench/bench_train_step.py [--config small] [--steps 40] [--repeats 2] [--threads 0]

The demo model (engram_model/configs/small.json) trained with engram_model.train.train on the
stdlib corpus, the same seed and batches for every row source:
  - in-process tables (LocalRows)
  - tables in the cluster, shards on this node (reads from shared memory)
  - tables in the cluster, shards on another Ray node (reads and pushes over the TCP data plane, or gRPC)
each cluster source through the node's fetch agent (the default: the read path in the agent's
process) or with the read path in the model's own process (ClusterRows(agent=False)), and
fetching the next step's rows once this step's push is sent (train's prefetch_ahead, the
default) or within the forward (one source from the other node: "no batch ahead").
Step time is the median over the timed steps (the first --warmup steps of each run are skipped).
Every run starts from the tables' initial rows, so the loss curves must agree; the benchmark
checks that they do. Beside each: CPU milliseconds a step by process role (the model's process,
the fetch agent, the shards, Ray's own; common.cpu_by_role), which carries over to machines where
the roles do not share two cores. Prints a table, appends bench/results/train_step.jsonl, draws
bench/results/train_step.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_jsonl, bar_plot, cpu_by_role, markdown_table, print_table, set_threads, threads_arg  # noqa: E402
from model_setup import memory_on, start_two_nodes  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="small")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default=None, choices=[None, "fp32", "bf16"])
    threads_arg(p, 0, "the default uses both, so the data path takes turns with the model's threads")
    args = p.parse_args(argv)

    import torch

    set_threads(args.threads)

    from engram_model.cluster_rows import ClusterRows
    from engram_model.config import load_config
    from engram_model.data import Corpus
    from engram_model.rows import table_specs
    from engram_model.train import DEFAULT_RUNS, load_or_train_tokenizer, train

    m, t = load_config(args.config)
    t = dataclasses.replace(t, steps=args.steps, eval_every=0, checkpoint_every=0,
                            **({"dtype": args.dtype} if args.dtype else {}))
    tok = load_or_train_tokenizer(None, t.tokenizer_vocab, t.val_fraction)
    corpus = Corpus.build(tok, t.val_fraction, cache_dir=DEFAULT_RUNS / "cache")
    cfg = m.for_tokenizer(tok)
    specs = table_specs(cfg)
    quiet = dict(tokenizer=tok, corpus=corpus, progress=False, log=lambda *a: None)
    print(f"{args.config}: {args.steps} steps x {t.tokens_per_step} tokens, {t.dtype}, torch threads "
          f"{torch.get_num_threads()}; tables {sum(s.nbytes for s in specs.values()) / 2**20:.1f} MiB", flush=True)

    ray, cluster = start_two_nodes()
    runs: dict[str, list] = {}
    losses: dict[str, list] = {}
    stats: dict[str, dict] = {}
    cpu: dict[str, list] = {}  # CPU seconds per step by process role (common.cpu_by_role), per repeat
    try:
        import engram_mem

        mems = {node: memory_on(node, f"train-{node}") for node in ("a", "b")}
        mems["b-grpc"] = engram_mem.connect(name="train-b", data_plane="grpc")  # today's path, same shards
        # (cluster, read path): through the node's fetch agent (the default) or in the model's process
        sources = {"cluster, same node, agent": ("a", True),
                   "cluster, same node, in-process path": ("a", False),
                   "cluster, other node, agent (TCP)": ("b", True),
                   "cluster, other node, agent (TCP), no batch ahead": ("b", True, False),
                   "cluster, other node, in-process path, TCP": ("b", False),
                   "cluster, other node, in-process path, gRPC": ("b-grpc", False)}
        for r in range(args.repeats):
            for name in ("in-process tables", *sources):
                rows, ahead = None, True
                if name != "in-process tables":
                    node, agent, ahead = (*sources[name], True)[:3]
                    mem = mems[node]
                    for spec in specs.values():  # every run starts from the initial rows
                        if spec.name in mem.tables():
                            mem.drop_table(spec.name)
                    rows = ClusterRows(mem, specs, agent=agent)
                c0 = cpu_by_role()
                res = train(m, t, rows=rows, prefetch_ahead=ahead, **quiet)
                c1 = cpu_by_role()
                cpu.setdefault(name, []).append({k: (c1[k] - c0[k]) / args.steps for k in c0})
                if rows is not None:
                    rows.flush()
                    stats[name] = rows.stats()
                    rows.close()
                step_s = np.diff([0.0] + res.history["elapsed"])[args.warmup:]
                runs.setdefault(name, []).extend(step_s.tolist())
                losses[name] = res.history["loss"]
                print(f"  repeat {r + 1}: {name:<44} median step {1000 * np.median(step_s):7.1f} ms", flush=True)
        for mem in mems.values():
            mem.close()
    finally:
        ray.shutdown()
        cluster.shutdown()

    base = float(np.median(runs["in-process tables"]))
    ref = np.array(losses["in-process tables"])
    table = []
    for name, secs in runs.items():
        med = float(np.median(secs))
        s = stats.get(name, {})
        table.append({"name": name, "median_step_ms": round(1000 * med, 1), "vs_in_process_pct": round(100 * (med / base - 1), 2),
                      "p90_step_ms": round(1000 * float(np.percentile(secs, 90)), 1),
                      "tokens_per_s": round(t.tokens_per_step / med, 1),
                      "max_loss_diff": float(np.max(np.abs(np.array(losses[name]) - ref))),
                      "exposed_wait_s": round(s.get("wait_s", 0.0), 3),
                      "prefetched_ahead": s.get("prefetched_ahead", 0),
                      **{f"cpu {k} ms/step": round(1000 * float(np.median([c[k] for c in cpu[name]])), 1)
                         for k in ("model", "agent", "shards", "ray")}})
    cols = ["name", "median_step_ms", "vs_in_process_pct", "p90_step_ms", "tokens_per_s", "max_loss_diff", "exposed_wait_s",
            "prefetched_ahead", "cpu model ms/step", "cpu agent ms/step", "cpu shards ms/step", "cpu ray ms/step"]
    print_table(table, cols, title=f"\ntraining step time, {args.config}, {len(runs['in-process tables'])} timed steps per source, "
                                   f"torch threads {torch.get_num_threads()}")
    path = append_jsonl("train_step", {"bench": "train_step", "args": vars(args), "results": table})
    png = bar_plot("train_step", [r["name"] for r in table], [r["median_step_ms"] for r in table], "median step (ms)",
                   f"training step time, {args.config}")
    print(f"\nappended {path}\nplot {png}\n\n" + markdown_table(table, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
