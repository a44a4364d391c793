"""Memory-service gather throughput, side by side in one run (a benchmark, not a test).

    .venv/bin/python bench/bench_memory.py [--rows 1000000] [--dim 256] [--batch 65536] [--calls 20]

On one table (1M rows x 256 fp32 = 1 GiB by default) with random 64k-row batches, it measures GB/s
and p50/p99 latency for:
  1. in-process gather (np.take), the physical limit
  2. this service over 1 and 2 shards, shards on the client's Ray node and on another Ray node
  3. a plain Ray actor call that returns the rows, same node and across nodes
  4. Redis MGET of the row values from a real redis-server (installed from Debian if missing)
The Ray cluster has two nodes on this machine: 127.0.0.2 (head, the client) and 127.0.0.3.
Prints a table, appends a JSON line to bench/results/memory.jsonl, draws bench/results/memory.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_jsonl, bar_plot, markdown_table, print_table, time_calls  # noqa: E402
from model_setup import NODE_A, NODE_B, start_two_nodes  # noqa: E402


class RowsActor:
    """The baseline: a Ray actor holding the table, returning rows from a method call."""

    def __init__(self, rows: int, dim: int, seed: int):
        from engram_mem.table import TableSpec

        self.table = TableSpec("t", rows, dim, seed=seed).init_range(0, rows)

    def gather(self, ids):
        return np.take(self.table, ids, axis=0)

    def node(self):
        import ray

        return ray.util.get_node_ip_address()


def bench_service(args, batches, node: str, shards: int, name: str):
    import engram_mem

    with engram_mem.connect(shards=shards, name=name, shard_resources={f"node_{node}": 1}) as mem:
        mem.create_table("t", rows=args.rows, dim=args.dim, seed=1)
        nodes = sorted({s["node_ip"] for s in mem.view.shards.values()})
        check = batches[0][:100]
        from engram_mem.table import TableSpec
        assert np.array_equal(mem.gather("t", check), TableSpec("t", args.rows, args.dim, seed=1).init_rows(check))
        where = "same node" if nodes == [NODE_A] else "other node"
        return time_calls(f"service {shards} shard{'s' * (shards > 1)}, {where}", lambda ids: mem.gather("t", ids),
                          batches, nbytes=args.batch * args.dim * 4,
                          extra={"kind": "service", "shards": shards, "shard_nodes": ",".join(nodes)})


def bench_actor(args, batches, node: str):
    import ray

    actor = ray.remote(RowsActor).options(num_cpus=1, resources={f"node_{node}": 1}).remote(args.rows, args.dim, 1)
    ip = ray.get(actor.node.remote())
    where = "same node" if ip == NODE_A else "other node"
    try:
        return time_calls(f"Ray actor call, {where}", lambda ids: ray.get(actor.gather.remote(ids)), batches,
                          nbytes=args.batch * args.dim * 4, extra={"kind": "ray-actor", "shard_nodes": ip})
    finally:
        ray.kill(actor)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((NODE_B, 0))
        return s.getsockname()[1]


def ensure_redis_server() -> str:
    path = shutil.which("redis-server")
    if path:
        return path
    print("redis-server not found: installing Debian's redis-server", flush=True)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "redis-server"], check=True,
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    return shutil.which("redis-server") or "/usr/bin/redis-server"


def bench_redis(args, batches):
    import redis

    from engram_mem.table import TableSpec

    port = _free_port()
    server = subprocess.Popen([ensure_redis_server(), "--bind", NODE_B, "--port", str(port), "--save", "",
                               "--appendonly", "no", "--protected-mode", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = redis.Redis(host=NODE_B, port=port)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        spec = TableSpec("t", args.rows, args.dim, seed=1)
        step = 20_000
        for start in range(0, args.rows, step):
            rows = spec.init_range(start, min(start + step, args.rows))
            r.mset({f"r{start + i}": rows[i].tobytes() for i in range(rows.shape[0])})

        def mget(ids):
            vals = r.mget([f"r{i}" for i in ids.tolist()])
            return np.frombuffer(b"".join(vals), dtype=np.float32).reshape(len(ids), args.dim)

        assert np.array_equal(mget(batches[0][:50]), spec.init_rows(batches[0][:50]))
        version = r.info("server")["redis_version"]
        return time_calls(f"Redis MGET, other node", mget, batches, nbytes=args.batch * args.dim * 4,
                          extra={"kind": "redis", "shard_nodes": NODE_B, "redis": version})
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--skip-redis", action="store_true")
    args = p.parse_args(argv)

    from engram_mem.table import TableSpec

    rng = np.random.default_rng(0)
    batches = [rng.integers(0, args.rows, args.batch) for _ in range(args.calls + 3)]
    nbytes = args.batch * args.dim * 4
    print(f"table {args.rows:,} x {args.dim} fp32 ({args.rows * args.dim * 4 / 2**30:.2f} GiB), "
          f"batches of {args.batch:,} random rows ({nbytes / 2**20:.0f} MiB), {args.calls} timed calls each", flush=True)

    table = TableSpec("t", args.rows, args.dim, seed=1).init_range(0, args.rows)
    results = [time_calls("in-process gather", lambda ids: np.take(table, ids, axis=0), batches, nbytes=nbytes,
                          extra={"kind": "in-process"})]
    del table
    ray, cluster = start_two_nodes(object_store_bytes=2 << 30)
    try:
        for node in ("a", "b"):
            for shards in (1, 2):
                results.append(bench_service(args, batches, node, shards, f"bench-{node}{shards}"))
                print(results[-1].row(), flush=True)
        for node in ("a", "b"):
            results.append(bench_actor(args, batches, node))
            print(results[-1].row(), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    if not args.skip_redis:
        results.append(bench_redis(args, batches))

    base = results[0].gbps
    rows = [dict(r.row(), x_in_process=round(r.gbps / base, 3)) for r in results]
    cols = ["name", "gbps", "x_in_process", "p50_ms", "p99_ms", "shard_nodes"]
    print_table(rows, cols, title="\ngather of 64k random rows (GB/s at p50)")
    by = {r.name: r for r in results}
    svc = by["service 1 shard, other node"].gbps
    floors = {
        "service_1shard_cross_vs_in_process": svc / base,
        "service_1shard_cross_vs_ray_actor_cross": svc / by["Ray actor call, other node"].gbps,
    }
    if "Redis MGET, other node" in by:
        floors["service_1shard_cross_vs_redis"] = svc / by["Redis MGET, other node"].gbps
    for k, v in floors.items():
        print(f"{k}: {v:.2f}x")
    path = append_jsonl("memory", {"bench": "memory", "args": vars(args), "results": rows, "ratios": floors})
    png = bar_plot("memory", [r.name for r in results], [r.gbps for r in results], "GB/s (p50)",
                   f"gather {args.batch:,} rows x {args.dim} fp32 from a {args.rows:,}-row table")
    print(f"\nappended {path}\nplot {png}\n\n" + markdown_table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
