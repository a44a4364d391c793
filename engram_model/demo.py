"""engram-demo: the whole story on one machine, with no cluster to prepare.

    engram-demo                          # embedded local Ray cluster, 2 shards, the "small" model
    engram-demo --steps 100 --shards 3   # shorter / wider
    engram-demo --memory 127.0.0.2:6379  # use a memory cluster that `engram-mem up` (or you) started

1. deploys a memory cluster (Ray actors owning shards of host-DRAM tables behind gRPC)
2. trains a small Engram-MoE whose Engram tables live in that cluster (rows fetched one layer
   ahead, gradients pushed to the shards' row-wise Adam), with a progress bar
3. starts an inference worker (a separate Ray actor) that attaches read-only, with a hot-row
   cache, and generates from a few prompts
4. prints the figures: loss, tokens/s, where rows came from, cache hit rate, exposed fetch wait
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

PROMPTS = ["def read_config(path):", "class LRUCache:", "import os\nimport sys\n\n\ndef main(", "    for key, value in"]


class InferenceWorker:
    """A Ray actor: loads the dense weights from a checkpoint, reads Engram rows from the cluster."""

    def __init__(self, checkpoint: str, memory_name: str, cache_bytes: int):
        import engram_mem
        from engram_model.cluster_rows import load_for_inference

        self.mem = engram_mem.connect(name=memory_name)
        self.model, self.tok = load_for_inference(checkpoint, self.mem, cache_bytes=cache_bytes)

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> dict:
        from engram_model.generate import generate

        rows = self.model.rows
        w0, t0 = rows.wait_s, time.perf_counter()
        texts = generate(self.model, self.tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                         seed=seed)
        seconds = time.perf_counter() - t0
        new_tokens = sum(len(self.tok.encode(t)) for t in texts)
        return {"texts": texts, "seconds": seconds, "new_tokens": new_tokens,
                "wait_s": rows.wait_s - w0, "rows": rows.stats()}

    def node(self) -> str:
        import ray

        return ray.util.get_node_ip_address()


def _print_figures(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * (width + 40))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("=" * (width + 40), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="engram-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="small")
    p.add_argument("--steps", type=int, help="training steps (default: the config's)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--memory", default=None, help="Ray address of an existing memory cluster (default: embedded)")
    p.add_argument("--name", default="engram-mem", help="memory cluster name")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--cache-mb", type=int, default=16, help="inference worker's hot-row cache per table")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import dataclasses

    import ray

    import engram_mem
    from engram_model.cluster_rows import ClusterRows
    from engram_model.config import load_config
    from engram_model.rows import table_specs
    from engram_model.train import load_or_train_tokenizer, train

    t_start = time.time()
    model_cfg, train_cfg = load_config(args.config)
    if args.steps:
        train_cfg = dataclasses.replace(train_cfg, steps=args.steps,
                                        eval_every=min(train_cfg.eval_every, args.steps) or args.steps)
    print(f"[1/4] memory cluster: {'attaching to ' + args.memory if args.memory else 'starting an embedded local one'}"
          f" ({args.shards} shards)", flush=True)
    with engram_mem.connect(args.memory, shards=args.shards, name=args.name) as mem:
        view = mem.view
        nodes = sorted({s["node_ip"] for s in view.shards.values()})
        print(f"      {len(view.shard_ids)} shards on {', '.join(nodes)}: "
              + ", ".join(s["address"] for s in view.shards.values()), flush=True)

        print("[2/4] training an Engram-MoE whose tables live in the memory cluster", flush=True)
        tok = load_or_train_tokenizer(None, train_cfg.tokenizer_vocab, train_cfg.val_fraction)
        cfg = model_cfg.for_tokenizer(tok)
        specs = table_specs(cfg)
        for spec in specs.values():  # a fresh run: start the tables from their initial rows
            if spec.name in mem.tables():
                mem.drop_table(spec.name)
        rows = ClusterRows(mem, specs)
        table_bytes = sum(s.nbytes for s in specs.values())
        res = train(model_cfg, train_cfg, out_dir=args.out, tokenizer=tok, rows=rows, progress=not args.no_progress,
                    name="demo")
        rows.flush()
        train_stats = rows.stats()
        h = res.history
        rows.close()

        print("[3/4] inference worker: a separate Ray actor, tables read-only from the cluster, hot-row cache",
              flush=True)
        worker = ray.remote(InferenceWorker).options(num_cpus=1).remote(
            os.path.abspath(os.path.join(args.out, "ckpt")), args.name, args.cache_mb << 20)
        out = ray.get(worker.generate.remote(PROMPTS, args.max_new_tokens, 0.0, 0))
        again = ray.get(worker.generate.remote(PROMPTS, args.max_new_tokens, 0.8, 1))
        worker_node = ray.get(worker.node.remote())
        for prompt, text in zip(PROMPTS, out["texts"]):
            print(f"--- {prompt!r}\n{prompt}{text}")
        shard_stats = mem.stats()
        ray.kill(worker)

    print("[4/4] figures", flush=True)
    steps, tokens = h["step"][-1], h["tokens"][-1]
    fetched = train_stats.get("node_local_rows", 0) + train_stats.get("remote_rows", 0)
    gen_tokens = out["new_tokens"] + again["new_tokens"]
    gen_s = out["seconds"] + again["seconds"]
    r = again["rows"]
    _print_figures([
        ("memory cluster", f"{len(view.shard_ids)} shards on {len(nodes)} node(s); Engram tables "
                           f"{sum(s.rows for s in specs.values()):,} rows, {table_bytes / 2**20:.1f} MiB"),
        ("model", f"{h['params']['total'] / 1e6:.2f}M params ({h['params']['engram_tables'] / 1e6:.2f}M in "
                  f"Engram tables), {h['params']['activated'] / 1e6:.2f}M activated/token"),
        ("training", f"{steps} steps, {tokens:,} tokens in {h['train_seconds']:.0f}s "
                     f"({tokens / max(h['train_seconds'], 1e-9):,.0f} tok/s)"),
        ("loss", f"train {h['loss'][0]:.3f} -> {sum(h['loss'][-10:]) / len(h['loss'][-10:]):.3f}, "
                 f"validation {h['val_loss'][-1]:.3f}"),
        ("training rows", f"{fetched:,} distinct rows fetched ({train_stats.get('node_local_rows', 0):,} from same-node "
                          f"shared memory, {train_stats.get('remote_rows', 0):,} from remote shards), "
                          f"{train_stats.get('pushes', 0)} gradient pushes"),
        ("training fetch wait", f"{train_stats['wait_s']:.2f}s exposed of {h['train_seconds']:.0f}s "
                                f"({100 * train_stats['wait_s'] / max(h['train_seconds'], 1e-9):.2f}%)"),
        ("inference", f"worker on {worker_node}: {gen_tokens} new tokens in {gen_s:.1f}s "
                      f"({gen_tokens / max(gen_s, 1e-9):.1f} tok/s, batch {len(PROMPTS)})"),
        ("inference rows", (f"cache hit rate {r['cache_hit_rate']:.1%} of distinct remote rows, "
                            if r.get("cache_lookups") else "cache idle (it fronts remote shards only), ") +
                           f"{r.get('node_local_rows', 0):,} same-node, {r.get('remote_rows', 0):,} from remote shards; "
                           f"exposed wait {100 * again['wait_s'] / max(again['seconds'], 1e-9):.2f}% of decode time"),
        ("shards", ", ".join(f"#{s['shard_id']}: {sum(s['requests'].values())} requests, "
                             f"{s['rows_pushed']:,} rows pushed" for s in shard_stats)),
        ("outputs", f"{Path(args.out).resolve()} (ckpt/, loss.png, history.json)"),
        ("total time", f"{time.time() - t_start:.0f}s"),
    ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
