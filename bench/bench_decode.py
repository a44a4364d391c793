"""Decode with the Engram tables in the memory cluster: exposed row wait and cache hit rate.

    .venv/bin/python bench/bench_decode.py [--batch 8] [--steps 192] [--table-gb 2.2] [--rounds 3] [--threads 1]

KV-cache decode, one token per step for a batch of sequences, fed the real next token of stdlib
source (teacher forcing), so the n-gram traffic is that of real code whatever the model's weights.
After each token the model hashes it with the previous ones and requests the next step's rows at
once (prefetch), before running the blocks ahead of the first Engram layer. For each row source:
  - in-process table (the reference)
  - cluster on this node (shared-memory tier)
  - cluster on another node (data plane), no cache / with a hot-row cache (it fronts remote shards)
each cluster source with its read path in the node's fetch agent (the default: de-duplication,
cache, the client and its event loop in the agent's process) or in the model's own process;
with --stagger-ab (the default), the other node's agent source once more with every prefetch
at the forward's start (ClusterRows stagger_ids=0), as before a later layer's small fetch waited
for the layer before it;
and, with --pin (the default where the machine has 2 cores or more), the agent sources from the
other node once more with the data path on cores of its own: the cluster's agent_cpus and
shard_cpus on the last core, the model's process on the others while it decodes (affinity.py;
as an operator keeps a node's model and data path apart; on this 2-core machine the "other
node"'s shards share that last core with the agent);
and, with --nice N (default -10; 0 skips it), the other node's agent source once more with the
agent's and the shards' threads at nice N (agent_nice / shard_nice), so that a woken fetch gets a
core ahead of the model's thread (below 0 needs CAP_SYS_NICE; without it the row says so).
it reports decode tokens/s, the exposed wait for rows as a share of step time, and the cache hit
rate (share of the step's distinct remote rows found in the cache), and the CPU each kind of
process spent per step (the model's own, the fetch agents', the shards', the rest of Ray's: on
this machine they share 2 cores; elsewhere each has its own). The sources take turns for
--rounds rounds (each cache emptied and re-warmed every round); each source's median round is
reported. Prints a table, appends bench/results/decode.jsonl, draws bench/results/decode.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_jsonl, bar_plot, cpu_by_role, markdown_table, print_table, set_threads, threads_arg  # noqa: E402
from model_setup import memory_on, model_config, start_two_nodes, text_windows  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=192)
    p.add_argument("--table-gb", type=float, default=2.2)
    p.add_argument("--cache-mb", type=int, default=32, help="hot-row cache per table")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each source's median round is reported")
    threads_arg(p, 1, "batch-8 decode runs no faster on two")
    p.add_argument("--pin", type=int, default=int((os.cpu_count() or 1) > 1),
                   help="1: also run the other node's agent sources with the data path on its own core")
    p.add_argument("--nice", type=int, default=-10,
                   help="also run the other node's agent source with its data path at this nice value (0: skip)")
    p.add_argument("--stagger-ab", type=int, default=1,
                   help="1: also run the other node's agent source with every prefetch at the forward's start "
                        "(stagger_ids=0), beside the default (a later layer's small fetch after the layer before)")
    args = p.parse_args(argv)

    import torch

    set_threads(args.threads)

    from engram_model.cluster_rows import ClusterRows
    from engram_model.model import EngramModel
    from engram_model.rows import LocalRows, table_specs

    cfg, _, tok = model_config("serving", args.table_gb)
    specs = table_specs(cfg)
    windows = text_windows(tok, [args.prompt + args.steps] * args.batch, seed=2)
    text = torch.from_numpy(np.stack(windows))                                   # [B, prompt + steps]
    # Other code warms the cache up: hits on the measured text come from n-grams common to both.
    warm_text = torch.from_numpy(np.stack(text_windows(tok, [args.prompt + args.steps] * args.batch, seed=3)))
    torch.manual_seed(0)
    local = LocalRows(specs, optimizer=None)
    model = EngramModel(cfg, rows=local, compress_lookup=tok.lookup).eval()

    from engram_mem.affinity import pin_process

    every_core = sorted(os.sched_getaffinity(0))
    data_core = every_core[-1:]                 # --pin: the data path's core; the model keeps the others
    pinned: set[int] = set()                    # id() of the sources whose model runs off the data path's core

    def decode(rows, text=text) -> dict:
        pin_process(every_core[:-1] if id(rows) in pinned else every_core, "the model's process")
        model.rows = rows
        w0 = getattr(rows, "wait_s", 0.0)
        cache = model.new_cache(args.batch, max_len=args.prompt + args.steps)
        with torch.inference_mode():
            model(text[:, :args.prompt], cache=cache)                            # prefill (not timed)
            w1 = getattr(rows, "wait_s", 0.0)
            c0, t0 = cpu_by_role(), time.perf_counter()
            for i in range(args.prompt, args.prompt + args.steps):
                logits, _ = model(text[:, i:i + 1], cache=cache)               # [B, 1, V]
            dt, c1 = time.perf_counter() - t0, cpu_by_role()
        wait = getattr(rows, "wait_s", 0.0) - w1
        cpu = {f"{k}_cpu_ms": 1000 * (c1[k] - c0[k]) / args.steps for k in c0}  # per step, by process role
        return {"seconds": dt, "wait_s": wait, "logits": logits, **cpu}

    ray, cluster = start_two_nodes(cpus=8)   # room for three clusters on the other node (pinned, niced)
    worker_nice = int(os.environ["RAY_worker_niceness"])   # Ray's workers' (start_two_nodes levels it, unless set)
    sources: dict[str, object] = {"in-process table": local}
    mems = []
    try:
        for node in ("a", "b") + (("b pinned",) if args.pin else ()) + (("b nice",) if args.nice else ()):
            pin, nice = node == "b pinned", node == "b nice"
            mem = memory_on(node[0], f"decode-{node.replace(' ', '-')}",
                            **(dict(agent_cpus=data_core, shard_cpus=data_core) if pin else {}),
                            **(dict(agent_nice=args.nice, shard_nice=args.nice) if nice else {}))
            mems.append(mem)
            where = "same node" if node == "a" else "other node"
            ClusterRows(mem, specs, train=False, agent=False).close()  # create the tables
            for agent in (True, False) if not (pin or nice) else (True,):  # the node's fetch agent (the default) or the model's own process
                path = "agent" if agent else "in-process path"
                path += ", data path on its own core" if pin else ""
                if nice:
                    probe = ClusterRows(mem, specs, train=False, create=False)
                    applied = probe.fetcher.summary().get("agent_nice")
                    probe.close()
                    path += f", data path at nice {args.nice}" + ("" if applied == args.nice else " (not allowed here)")
                if node == "a":  # the cache fronts remote shards only
                    sources[f"cluster ({where}), {path}"] = ClusterRows(mem, specs, train=False, create=False,
                                                                        agent=agent)
                    continue
                for cache_mb in (0, args.cache_mb):
                    label = f"cluster ({where}), {path}, " + (f"cache {cache_mb} MB/table" if cache_mb else "no cache")
                    sources[label] = ClusterRows(mem, specs, train=False, create=False, cache_bytes=cache_mb << 20,
                                                 agent=agent)
                    if pin:
                        pinned.add(id(sources[label]))
                if node == "b" and agent and args.stagger_ab:  # what holding back the later layer's fetch buys
                    sources[f"cluster ({where}), {path}, no cache, every prefetch at the start"] = ClusterRows(
                        mem, specs, train=False, create=False, agent=agent, stagger_ids=0)
        decode(local)
        ref = decode(local)
        runs: dict[str, list[dict]] = {k: [] for k in sources}
        for r in range(args.rounds):  # the sources take turns, so drifting machine load hits them alike
            for label, rows in sources.items():
                if rows is not local:
                    rows.fetcher.clear_caches()
                    decode(rows, warm_text)                    # warm-up on other text (fills the cache)
                s0 = rows.stats() if rows is not local else {}
                out = decode(rows)
                s1 = rows.stats() if rows is not local else {}
                assert torch.equal(out["logits"], ref["logits"]), f"{label}: rows from the cluster changed the output"
                looked = s1.get("cache_lookups", 0) - s0.get("cache_lookups", 0)
                hits = s1.get("cache_hits", 0) - s0.get("cache_hits", 0)
                runs[label].append({**out, "cache_hit_rate": hits / looked if looked else 0.0,
                                    "node_local_rows": s1.get("node_local_rows", 0) - s0.get("node_local_rows", 0),
                                    "remote_rows": s1.get("remote_rows", 0) - s0.get("remote_rows", 0)})
                print(f"  round {r + 1}: {label:<58} {1000 * out['seconds'] / args.steps:6.2f} ms/step, "
                      f"wait {100 * out['wait_s'] / out['seconds']:.2f}%", flush=True)
        results = []
        for label, rs in runs.items():  # the round with the median time stands for the source
            med = sorted(rs, key=lambda x: x["seconds"])[len(rs) // 2]
            results.append({"name": label, **med})
    finally:
        pin_process(every_core, "the model's process")
        for rows in sources.values():
            if rows is not local:
                rows.close()
        for mem in mems:
            mem.close()
        ray.shutdown()
        cluster.shutdown()

    base = results[0]["seconds"]
    table = [{"name": r["name"], "tokens_per_s": round(args.batch * args.steps / r["seconds"], 1),
              "vs_in_process_pct": round(100 * (base / r["seconds"] - 1), 2),
              "exposed_wait_pct": round(100 * r["wait_s"] / r["seconds"], 2),
              "ms_per_step": round(1000 * r["seconds"] / args.steps, 2),
              "cache_hit_rate": round(r.get("cache_hit_rate", 0.0), 3),
              "node_local_rows": r.get("node_local_rows", 0), "remote_rows": r.get("remote_rows", 0),
              **{k: round(r[k], 2) for k in ("model_cpu_ms", "agent_cpu_ms", "shards_cpu_ms", "ray_cpu_ms")}}
             for r in results]
    cols = ["name", "tokens_per_s", "vs_in_process_pct", "exposed_wait_pct", "ms_per_step", "cache_hit_rate",
            "node_local_rows", "remote_rows", "model_cpu_ms", "agent_cpu_ms", "shards_cpu_ms", "ray_cpu_ms"]
    print_table(table, cols, title=f"\ndecode, batch {args.batch}, {args.steps} steps after a {args.prompt}-token prompt; "
                                   f"shards and agents at nice {worker_nice} unless the row says otherwise")
    path = append_jsonl("decode", {"bench": "decode", "args": vars(args), "ray_worker_niceness": worker_nice,
                                   "results": table})
    png = bar_plot("decode", [r["name"] for r in table], [r["exposed_wait_pct"] for r in table],
                   "exposed row wait, % of step time", f"decode, batch {args.batch}: time waiting for Engram rows")
    print(f"\nappended {path}\nplot {png}\n\n" + markdown_table(table, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
