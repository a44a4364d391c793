"""The bulk data plane (framed TCP) against today's gRPC path, through the real client, side by side in one run.

    .venv/bin/python bench/bench_data_plane.py [--rows 1000000] [--dim 256] [--batch 65536] [--calls 8]
                                               [--rounds 3] [--shards 1,2,4] [--quick]

A Ray cluster of two nodes on this machine: 127.0.0.2 (the client's) and 127.0.0.3 (the "other
node", where the shards run). For each shard count one memory cluster holds a 1M x 256 fp32
table (1 GiB); two clients attach to it: one moving rows over the data plane (data_plane="tcp",
the default) and one over gRPC only. In `--rounds` interleaved rounds (the order rotates) each
does `--calls` gathers of 64k random row ids (with repeats, as real traffic has: MemoryClient.gather,
de-duplication included) and, the in-process np.take of the same ids beside them. Then pushes
of 8,192 distinct ids (SGD) on each. Reported per configuration: GB/s at the median call (and the
spread of the rounds' medians), x in-process, x gRPC, p50/p99 ms, CPU seconds per GB moved (the
client process and every shard process: it carries over to real machines, while wall time here
does not, as the "other node" shares the client's 2 cores), the GB/s those CPU seconds allow on
this machine's cores (a path that reaches it is bound by CPU, not by waiting), and the client's
copies per row.
Each of in-process and TCP runs twice: returning a new array (np.take's own; the client's from
its ReplyBuffers, memory of the arrays the benchmark dropped) and into one buffer of the caller's,
reused (out=), which is how the model's row sources read; "x in-process out=" compares with the
latter. A third TCP client has ReplyBuffers off (every array new memory, as before them). Beside them, the wire's own ceiling here: a plain process on the other node's address sending
the same number of bytes from one buffer per request (kernel TCP, no gather, no framing).
Then 8 threads of one client gathering at once (tail latency), and the same-node tier (the
shard's shared memory read in place) on a shard on the client's node.

Prints a table, appends a JSON line to bench/results/data_plane.jsonl, draws
bench/results/data_plane.png and writes bench/results/data_plane.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, append_jsonl, bar_plot, markdown_table, print_table  # noqa: E402
from model_setup import NODE_B, start_two_nodes  # noqa: E402


REMOTE = ("tcp", "grpc", "tcp-out", "tcp-fresh")  # configurations whose rows come from the shards (their CPU counts)


def cpu_of(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def shard_pids(mem) -> list[int]:
    return [s["pid"] for s in mem.refresh().shards.values()]


def _loopback_server(host: str, nbytes: int, q) -> None:
    """The wire's own ceiling: a process on the other node's address that answers each 1-byte
    request with `nbytes` from one buffer (no gather, no framing), as fast as the kernel moves it."""
    import socket

    srv = socket.create_server((host, 0))
    q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    buf = np.ones(nbytes, np.uint8)
    while conn.recv(1):
        conn.sendall(buf)


class Loopback:
    def __init__(self, host: str, nbytes: int):
        import multiprocessing as mp
        import socket

        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        self.proc = ctx.Process(target=_loopback_server, args=(host, nbytes, q), daemon=True)
        self.proc.start()
        self.sock = socket.create_connection((host, q.get(timeout=60)))
        self.buf = memoryview(bytearray(nbytes))

    def read(self, _ids) -> None:
        self.sock.sendall(b"x")
        got, n = 0, len(self.buf)
        while got < n:
            got += self.sock.recv_into(self.buf[got:])

    def close(self) -> None:
        self.sock.close()
        self.proc.kill()


def timed(fn, inputs):
    secs = []
    for x in inputs:
        t0 = time.perf_counter()
        fn(x)
        secs.append(time.perf_counter() - t0)
    return secs


def concurrent_calls(fn, inputs, threads: int):
    """`threads` threads, each calling fn on its share of inputs; per-call seconds and the wall time."""
    secs, lock = [], threading.Lock()

    def worker(xs):
        s = timed(fn, xs)
        with lock:
            secs.extend(s)

    ts = [threading.Thread(target=worker, args=(inputs[i::threads],)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return secs, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--calls", type=int, default=8, help="timed gathers per round and configuration")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shards", default="1,2,4")
    p.add_argument("--push-ids", type=int, default=8192)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="200k rows, 2 rounds, 4 calls, shards 1,2: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.rounds, args.calls, args.shards = 200_000, 2, 4, "1,2"
    import psutil

    import engram_mem
    from engram_mem.client.buffers import ReplyBuffers
    from engram_mem.table import TableSpec
    from engram_mem.worker.nodelocal import NodeLocalTier

    rng = np.random.default_rng(0)
    nbytes = args.batch * args.dim * 4
    spec = TableSpec("t", args.rows, args.dim, seed=1)
    table = spec.init_range(0, args.rows)
    me = psutil.Process()
    results, extra_rows = [], []

    def gb(n_calls):
        return n_calls * nbytes / 1e9

    ray, cluster = start_two_nodes(object_store_bytes=1 << 30)
    try:
        for shards in [int(s) for s in args.shards.split(",")]:
            name = f"bench-dp-{shards}"
            with engram_mem.connect(shards=shards, name=name, shard_resources={"node_b": 1}) as tcp:
                tcp.create_table_spec(spec)
                grpc_ = engram_mem.connect(name=name, data_plane="grpc")
                fresh = engram_mem.connect(name=name)  # TCP, each gather's array new memory (the pool off)
                fresh.buffers = ReplyBuffers(keep_bytes=0)
                pids = shard_pids(tcp)
                check = rng.integers(0, args.rows, 1000)
                for c in (tcp, grpc_, fresh):
                    assert np.array_equal(c.gather("t", check), table[check]), "rows differ from the table"
                wire = Loopback(NODE_B, nbytes)
                own = np.empty((args.batch, args.dim), np.float32)  # the caller's buffer, reused call after call
                confs = {"in-process": lambda ids: np.take(table, ids, axis=0),
                         "tcp": lambda ids: tcp.gather("t", ids), "grpc": lambda ids: grpc_.gather("t", ids),
                         "loopback": wire.read,
                         "in-process-out": lambda ids: np.take(table, ids, axis=0, out=own, mode="clip"),
                         "tcp-out": lambda ids: tcp.gather("t", ids, out=own),
                         "tcp-fresh": lambda ids: fresh.gather("t", ids)}
                res = {k: {"secs": [], "rounds": [], "cpu": 0.0} for k in confs}
                for fn in confs.values():  # warm-up: connections, pages
                    for _ in range(2):
                        fn(rng.integers(0, args.rows, args.batch))
                t_counts0 = tcp.transport_counts()["tcp"]
                t_client0 = tcp.transport_counts()["client"]
                for r in range(args.rounds):
                    order = list(confs)
                    order = order[r % len(order):] + order[:r % len(order)]
                    for k in order:
                        batches = [rng.integers(0, args.rows, args.batch) for _ in range(args.calls)]
                        c0 = me.cpu_times()
                        others = pids if k in REMOTE else [wire.proc.pid] if k == "loopback" else []
                        s0 = cpu_of(others)
                        secs = timed(confs[k], batches)
                        c1 = me.cpu_times()
                        s1 = cpu_of(others)
                        res[k]["secs"] += secs
                        res[k]["rounds"].append(nbytes / float(np.median(secs)) / 1e9)
                        res[k]["cpu"] += (c1.user - c0.user + c1.system - c0.system) + (s1 - s0)
                t_counts = tcp.transport_counts()["tcp"]
                moved = t_counts["direct_bytes"] + t_counts["staged_bytes"] - t_counts0["direct_bytes"] - \
                    t_counts0["staged_bytes"]
                staged = t_counts["staged_bytes"] - t_counts0["staged_bytes"] + \
                    tcp.transport_counts()["client"]["repeat_bytes"] - t_client0["repeat_bytes"]
                # pushes of distinct ids
                push = {}
                for k, c in (("tcp", tcp), ("grpc", grpc_)):
                    ids = [np.sort(rng.choice(args.rows, args.push_ids, replace=False)) for _ in range(args.calls)]
                    g = np.zeros((args.push_ids, args.dim), np.float32)
                    c.push("t", ids[0], g, lr=0.0)
                    push[k] = timed(lambda i: c.push("t", i, g, lr=0.0), ids)
                base = float(np.median(res["in-process"]["rounds"]))
                base_out = float(np.median(res["in-process-out"]["rounds"]))
                g_gbps = float(np.median(res["grpc"]["rounds"]))
                for k, v in res.items():
                    gbps = float(np.median(v["rounds"]))
                    label = {"loopback": f"kernel TCP to the other node, no gather (the wire's ceiling), {shards}",
                             "in-process-out": f"in-process into the caller's buffer (out=), {shards}",
                             "tcp-out": f"tcp into the caller's buffer (out=), {shards}",
                             "tcp-fresh": f"tcp, every array new memory (no ReplyBuffers), {shards}"}.get(
                        k, f"{k}, {shards}")
                    row = {"config": f"{label} shard{'s' * (shards > 1)}" + (", other node" if k in REMOTE else ""),
                           "transport": k, "shards": shards, "GB/s": gbps,
                           "spread": f"{min(v['rounds']):.2f}-{max(v['rounds']):.2f}",
                           "x in-process": gbps / base, "x in-process out=": gbps / base_out, "x grpc": gbps / g_gbps,
                           "p50 ms": float(np.percentile(v["secs"], 50)) * 1e3,
                           "p99 ms": float(np.percentile(v["secs"], 99)) * 1e3,
                           "CPU s/GB": v["cpu"] / gb(len(v["secs"]))}
                    # What this machine's cores could move if every process's share ran at once: a
                    # path near it is bound by its CPU, not by waiting (here the "other node" is these cores).
                    row["CPU-bound GB/s"] = (os.cpu_count() or 1) / row["CPU s/GB"]
                    if k in push:
                        row["push p50 ms"] = float(np.percentile(push[k], 50)) * 1e3
                    if k == "tcp":
                        row["client copies/row"] = staged / max(moved, 1)
                    elif k == "grpc":
                        row["client copies/row"] = 1.0
                    results.append(row)
                    print_table([row], list(row), title="")
                if shards == 1:  # 8 threads at once on one client, each transport
                    for k, c in (("tcp", tcp), ("grpc", grpc_)):
                        batches = [rng.integers(0, args.rows, args.batch) for _ in range(args.threads * 2)]
                        secs, wall = concurrent_calls(lambda ids: c.gather("t", ids), batches, args.threads)
                        extra_rows.append({"config": f"{k}, 1 shard, {args.threads} threads", "transport": k,
                                           "GB/s": len(batches) * nbytes / wall / 1e9,
                                           "p50 ms": float(np.percentile(secs, 50)) * 1e3,
                                           "p99 ms": float(np.percentile(secs, 99)) * 1e3})
                        print_table([extra_rows[-1]], list(extra_rows[-1]))
                grpc_.close()
                fresh.close()
                wire.close()
        # the same-node tier (the product path for a worker on a shard's node)
        with engram_mem.connect(shards=1, name="bench-dp-local", shard_resources={"node_a": 1}) as mem:
            mem.create_table_spec(spec)
            tier = NodeLocalTier(mem)
            rank = tier.local_ranks()[0]
            ids = [np.sort(rng.choice(args.rows, args.batch, replace=False)) for _ in range(args.calls * args.rounds)]
            assert np.array_equal(tier.read("t", rank, ids[0][:100]), table[ids[0][:100]])
            a, b = [], []
            for i in range(args.rounds):  # interleaved with in-process
                part = ids[i * args.calls:(i + 1) * args.calls]
                a.append(nbytes / float(np.median(timed(lambda x: tier.read("t", rank, x), part))) / 1e9)
                b.append(nbytes / float(np.median(timed(lambda x: np.take(table, x, axis=0), part))) / 1e9)
            extra_rows.append({"config": "same-node tier (shared memory)", "transport": "shm",
                               "GB/s": float(np.median(a)), "x in-process": float(np.median(a)) / float(np.median(b))})
            print_table([extra_rows[-1]], list(extra_rows[-1]))
    finally:
        ray.shutdown()
        cluster.shutdown()

    cols = ["config", "GB/s", "spread", "x in-process", "x in-process out=", "x grpc", "p50 ms", "p99 ms", "CPU s/GB",
            "CPU-bound GB/s", "push p50 ms", "client copies/row"]
    title = (f"\ngathers of {args.batch:,} random ids (with repeats) x {args.dim} fp32 from a {args.rows:,}-row table, "
             f"shards on the other node, {args.rounds} rounds x {args.calls} calls; pushes of {args.push_ids:,} ids")
    print_table(results, cols, title=title)
    cols2 = ["config", "GB/s", "x in-process", "p50 ms", "p99 ms"]
    print_table(extra_rows, cols2, title="\nconcurrency and the same-node tier")
    ratios = {}
    by = {(r["transport"], r["shards"]): r for r in results}
    for s in {r["shards"] for r in results}:
        t, g, o = by.get(("tcp", s)), by.get(("grpc", s)), by.get(("tcp-out", s))
        if o:
            ratios[f"tcp_out_{s}shard_x_in_process_out"] = o["x in-process out="]
        if t and g:
            ratios[f"tcp_{s}shard_x_in_process"] = t["x in-process"]
            ratios[f"tcp_{s}shard_x_grpc"] = t["x grpc"]
            ratios[f"push_p50_grpc_over_tcp_{s}shard"] = g["push p50 ms"] / t["push p50 ms"]
        w = by.get(("loopback", s))
        if w:
            ratios[f"wire_ceiling_{s}shard_x_in_process"] = w["x in-process"]
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    suffix = "-quick" if args.quick else ""
    path = append_jsonl(f"data_plane{suffix}", {"bench": "data_plane", "args": vars(args), "results": results,
                                                 "extra": extra_rows, "ratios": ratios})
    png = bar_plot(f"data_plane{suffix}", [r["config"] for r in results + extra_rows],
                   [r["GB/s"] for r in results + extra_rows], "GB/s (median call)",
                   f"gather {args.batch:,} rows x {args.dim} fp32: in-process, TCP data plane, gRPC")
    md = os.path.join(RESULTS, f"data_plane{suffix}.md")
    with open(md, "w") as f:
        f.write(title.strip() + "\n\n" + markdown_table(results, cols) + "\n\n" + markdown_table(extra_rows, cols2) +
                "\n\n" + "\n".join(f"- {k}: {v:.2f}" for k, v in ratios.items()) + "\n")
    print(f"\nappended {path}\nplot {png}\n{md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
